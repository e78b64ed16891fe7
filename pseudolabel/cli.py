"""The ``pseudolabel`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _overrides(pairs: list[str]) -> dict:
    from pseudolabel.schemas.spec import SpecError, parse_value

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {pair!r}: expected key=value, e.g. --set resources.actors=2")
        out[key.strip()] = parse_value(value)
    return out


def cmd_run(args) -> int:
    from pseudolabel.engine.pipeline import run_job
    from pseudolabel.jobs.demo.data import ensure_demo_input
    from pseudolabel.models.specs import load_spec

    job = load_spec(args.job, _overrides(args.set))  # fails before Ray starts
    ensure_demo_input(job)
    try:
        summary = run_job(job, address=args.address, progress=not args.quiet, verbose=args.verbose,
                          retry_errors=args.retry_errors)
    except KeyboardInterrupt:
        from pseudolabel.engine.pipeline import count_labels

        done = count_labels(job)["distinct"]
        print(f"\ninterrupted: {done} images committed in {job.output.uri}; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    print(f"\n{summary['ok']} ok, {summary['error']} error of {summary['images']} images; "
          f"{summary['this_run']} labelled in this run at {summary['images_per_s']} images/s; "
          f"labels in {summary['output_uri']}/labels", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    """Exit 0 when every image of the output is there exactly once (labels and checkpoint agree), else 1."""
    from pseudolabel.engine.pipeline import verify_output

    ok, line, details = verify_output(args.output, _storage(args))
    print(line)
    for detail in details:
        print(f"  {detail}")
    return 0 if ok else 1


def cmd_demo_data(args) -> int:
    from pseudolabel.jobs.demo.data import generate

    info = generate(args.out, images=args.images, shards=args.shards, seed=args.seed, size=args.size,
                    storage=_storage(args), layout=args.layout)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _storage(args):
    from pseudolabel.schemas.spec import StorageSpec

    return StorageSpec(endpoint_url=args.endpoint_url) if getattr(args, "endpoint_url", None) else None


def _require_run(output: str, args) -> None:
    """Commands that read a run refuse a path that holds none (a mistyped path is not an empty run)."""
    from pseudolabel.engine.errors import NoRunError
    from pseudolabel.engine.pipeline import LABELS
    from pseudolabel.storage import exists, join

    if not exists(join(output, LABELS), _storage(args)):
        raise NoRunError(f"{output} holds no run (no {LABELS}/ folder): check the path")


def cmd_export(args) -> int:
    from pseudolabel.jobs.outputs.export import export

    _require_run(args.output, args)
    options = {"min_score": args.min_score, "split": args.split, "images": args.images, "lowest": args.lowest,
               "shape": args.shape, "image_prefix": args.image_prefix}
    info = export(args.output, args.format, args.out, storage=_storage(args), gt_json=args.gt,
                  labeler=args.labeler or None, **options)  # ExportError is a UsageError: main prints it, exit 2
    print(json.dumps(info, indent=2, default=str))
    return 0


class _ExportFormats:
    """The export format names, read from ``pseudolabel.jobs.outputs.export.EXPORTERS`` only when argparse
    checks a value or prints help (so building the parser does not import the exporters)."""

    def _names(self) -> list[str]:
        from pseudolabel.jobs.outputs.export import EXPORTERS

        return list(EXPORTERS)

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()


def cmd_evaluate(args) -> int:
    from pseudolabel.jobs.evaluation.evaluate import evaluate, parse_category_map

    _require_run(args.output, args)
    kwargs = dict(class_agnostic=args.class_agnostic, task=args.task, max_dets=args.max_dets)
    if args.category_map:
        kwargs["category_map"] = parse_category_map(args.category_map)
    if args.semantic_root:
        kwargs["gt_semantic_root"] = args.semantic_root
    if args.curve:
        kwargs["curve_png"] = args.curve
    if args.labeler:
        kwargs["labeler"] = args.labeler
    for name in ("precision_tol", "recall_tol", "border"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    result = evaluate(args.output, args.gt, storage=_storage(args), **kwargs)
    print(json.dumps(result, indent=2, default=float))
    return 0


def cmd_report(args) -> int:
    from pseudolabel.jobs.outputs.report import report

    _require_run(args.output, args)
    path = report(args.output, args.out, storage=_storage(args), sample=args.sample)
    print(path)
    return 0


def cmd_models(args) -> int:
    from pseudolabel.models.registry import labeler_class, labeler_names

    for name in labeler_names():
        try:
            cls = labeler_class(name)
        except ImportError as err:
            print(f"{name}: (unavailable: {err})\n")
            continue
        tag = " [baseline]" if cls.baseline else ""
        print(f"{name}{tag}: {cls.summary}")
        if cls.default_weights:
            print(f"  weights (default): {cls.default_weights}")
        if cls.has_device_half():
            print(f"  dtype auto = {cls.cuda_dtype} on CUDA, float32 elsewhere (a named dtype is used as asked)")
        for field, info in cls.Params.model_fields.items():
            value = "(required)" if info.is_required() else repr(info.get_default(call_default_factory=True))
            desc = f"  {info.description}" if info.description else ""
            print(f"  {field} = {value}{desc}")
        print()
    return 0


def _train(module: str, func: str):
    def cmd(args) -> int:
        import importlib

        from pseudolabel.schemas.spec import load_yaml_with_overrides

        fn = getattr(importlib.import_module(module), func)
        result = fn(load_yaml_with_overrides(args.job, _overrides(args.set)))
        losses = result.pop("losses", None)
        if losses:
            result["loss_first"], result["loss_last"] = float(losses[0]), float(losses[-1])
        print(json.dumps(result, indent=2, default=str))
        return 0

    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pseudolabel", description="Distributed pseudo-labeling on Ray.")
    from pseudolabel.version import __version__

    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"pseudolabel {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a labeling job")
    r.add_argument("job", help="job spec YAML")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    r.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for the cluster of --address (default: PSEUDOLABEL_CONNECT_TIMEOUT or 10)")
    r.add_argument("--quiet", action="store_true", help="no progress line")
    r.add_argument("--retry-errors", action="store_true",
                   help="label the images of error rows again (rows of transient failures always are)")
    r.set_defaults(fn=cmd_run)

    vf = sub.add_parser("verify", help="check that every image of a run's output is there exactly once")
    vf.add_argument("output", metavar="OUTPUT")
    vf.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the AWS environment)")
    vf.set_defaults(fn=cmd_verify)

    d = sub.add_parser("demo-data", help="write a synthetic sharded dataset with ground truth")
    d.add_argument("out", metavar="OUT_URI")
    d.add_argument("--images", type=int, default=64)
    d.add_argument("--shards", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--layout", choices=["folder", "webdataset", "parquet"], default="folder")
    d.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the AWS environment)")
    d.set_defaults(fn=cmd_demo_data)

    e = sub.add_parser("export", help="export a run's labels (COCO, COCO results, panoptic, YOLO, masks, Label Studio)")
    e.add_argument("output", metavar="OUTPUT")
    e.add_argument("--format", choices=_ExportFormats(), default="coco", metavar="FORMAT",
                   help="one of: %(choices)s (default: %(default)s)")
    e.add_argument("--out", required=True,
                   help="JSON path (panoptic: PNGs go beside it; label-studio: config XML beside it); "
                        "yolo, masks: the dataset folder")
    e.add_argument("--gt", default=None,
                   help="coco-results (required): ground-truth COCO JSON; image ids are matched by file name")
    e.add_argument("--labeler", action="append", default=[], metavar="NAME",
                   help="panoptic: only this token labeler's tokens (repeat for several; default: all)")
    e.add_argument("--min-score", type=float, default=None, metavar="S",
                   help="drop annotations scored below S (all formats but panoptic); per-category "
                        "score_threshold of the run's ontology applies too")
    e.add_argument("--split", default=None, metavar="NAME=FRAC,...",
                   help="yolo: e.g. train=0.9,val=0.1 (stable: by a hash of image_id)")
    e.add_argument("--images", choices=["link", "copy", "none"], default=None,
                   help="yolo: link local source images (default), copy them, or write none")
    e.add_argument("--lowest", type=int, default=None, metavar="N",
                   help="label-studio: keep the N least confident images, least confident first")
    e.add_argument("--shape", choices=["brush", "polygon"], default=None,
                   help="label-studio: brushlabels (RLE, default) or polygonlabels")
    e.add_argument("--image-prefix", default=None, metavar="PREFIX",
                   help="label-studio: data.image = PREFIX + file name (default: the source URI)")
    e.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the AWS environment)")
    e.set_defaults(fn=cmd_export)

    v = sub.add_parser("evaluate", help="score a run against ground truth; prints JSON")
    v.add_argument("output", metavar="OUTPUT")
    v.add_argument("--gt", required=True, help="ground-truth COCO instances JSON")
    v.add_argument("--task", choices=["instances", "tokens", "semantic"], default="instances")
    v.add_argument("--class-agnostic", action="store_true", help="instances: every category counts as one")
    v.add_argument("--category-map", action="append", default=[], metavar="RUN_NAME=GT_NAME",
                   help="score the run's category RUN_NAME as the ground truth's GT_NAME (repeat for several; "
                        "categories are otherwise matched by name)")
    v.add_argument("--max-dets", type=int, default=100)
    v.add_argument("--semantic-root", default=None, help="folder of ground-truth label PNGs (task semantic)")
    v.add_argument("--curve", default=None, help="tokens: write a recall-vs-token-count plot here (PNG)")
    v.add_argument("--precision-tol", type=float, default=None,
                   help="tokens: pixel tolerance of boundary precision (default 2)")
    v.add_argument("--recall-tol", type=float, default=None,
                   help="tokens: pixel tolerance of boundary recall (default 5)")
    v.add_argument("--border", type=int, default=None,
                   help="tokens: ignored band at the image border, pixels (default 5)")
    v.add_argument("--labeler", action="append", default=[], metavar="NAME",
                   help="tokens: score only this labeler's tokens (repeat for several; default: all)")
    v.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the AWS environment)")
    v.set_defaults(fn=cmd_evaluate)

    rp = sub.add_parser("report", help="an offline HTML page with overlays of a sample of images")
    rp.add_argument("output", metavar="OUTPUT")
    rp.add_argument("--out", required=True, help="folder for index.html and the PNGs")
    rp.add_argument("--sample", type=int, default=24)
    rp.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the AWS environment)")
    rp.set_defaults(fn=cmd_report)

    m = sub.add_parser("models", help="list the labelers with their parameters and defaults")
    m.set_defaults(fn=cmd_models)

    for name, module, func, text in [
        ("train-directsam", "pseudolabel.jobs.training.directsam", "train_directsam", "fine-tune DirectSAM"),
        ("train-foba", "pseudolabel.jobs.training.foba", "train_foba",
         "FOBA: concept-distillation fine-tuning (stage: finetune) and the segmentation network (stage: segmentation)"),
        ("train-incontext", "pseudolabel.jobs.training.incontext", "train_incontext", "train the SeFM network"),
    ]:
        t = sub.add_parser(name, help=text)
        t.add_argument("job", help="training spec YAML")
        t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        t.set_defaults(fn=_train(module, func))
    return p


def _bound_cluster_wait(args) -> None:
    """``run`` on a cluster: the wait for it is bounded, and Ray reads part of the bound when it is
    imported, so this comes before anything imports Ray."""
    from pseudolabel.engine.cluster import CONNECT_TIMEOUT_ENV, bound_ray_connect, cluster_address, connect_timeout

    if getattr(args, "connect_timeout", None) is not None:
        os.environ[CONNECT_TIMEOUT_ENV] = str(args.connect_timeout)
    connect_timeout()  # a bad value is one line now, not after the spec was read
    if cluster_address(getattr(args, "address", None)):
        bound_ray_connect()


def main(argv: list[str] | None = None) -> int:
    """Every mistake of the user's (spec, paths, storage, cluster) is one line ``error: ...`` on stderr and
    exit status 2; ``--verbose`` adds the traceback of those met mid-run."""
    from pseudolabel.engine.errors import UserError, environment_problem, one_line

    args = build_parser().parse_args(argv)
    # our own progress notes at INFO; other libraries' (botocore: "Found credentials in environment
    # variables.") only from WARNING up, or INFO with --verbose
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("pseudolabel").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "run":
            _bound_cluster_wait(args)
        return args.fn(args)
    except UserError as err:
        print(f"error: {one_line(err, limit=10_000)}", file=sys.stderr)
        return 2
    except Exception as err:  # an S3 or disk problem met mid-run is the user's to fix too
        problem = environment_problem(err)
        if problem is None:
            raise
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
