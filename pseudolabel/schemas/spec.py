"""The job spec: YAML validated by pydantic before Ray starts.

Every model forbids unknown fields, so a typo is rejected with the dotted path of the field.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A job spec that cannot run; the message names the offending field(s)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoSpec(_Strict):
    """Synthetic demo data written to the input's parent folder when the input does not exist yet."""

    images: int = Field(64, ge=1)
    shards: int = Field(4, ge=1)
    seed: int = 0
    size: int = Field(256, ge=32)
    layout: Literal["folder", "webdataset", "parquet"] = "folder"


class InputSpec(_Strict):
    uri: str = Field(description="folder, tar shards, Parquet files or COCO image root: local path, file:// or s3://")
    format: str = Field("auto", pattern=r"^[A-Za-z_][\w.-]*(:[A-Za-z_][\w.]*)?$",
                        description="auto | folder | webdataset | parquet | coco | a registered name | "
                                    "'package.module:Class' (checked against the format registry before Ray starts)")
    coco_json: str | None = Field(None, description="COCO instances JSON, for format=coco")
    image_column: str | None = Field(None, description="Parquet column holding the image (default: first binary "
                                                       "or {bytes,path} column)")
    id_column: str | None = Field(None, description="Parquet column holding a stable image id (optional)")
    prompts_column: str | None = Field(None, description="Parquet column with per-row prompts/seeds as JSON (optional)")
    extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"])
    max_pixels: int = Field(89_478_485, gt=0,
                            description="decompression-bomb cap: images with more pixels become error rows")
    limit: int | None = Field(None, gt=0, description="label only the first N listed images")
    demo: DemoSpec | None = Field(None, description="generate demo data (at the parent of uri) if uri is missing")
    fetch_retries: int = Field(7, ge=1, description="tries of a fetch or listing that fails transiently (network, "
                                                    "throttling, 5xx); still failing, the image is a 'retry' row")
    fetch_backoff_s: float = Field(1.0, ge=0, description="wait before the 2nd try, doubled each try up to 16 s "
                                                          "(defaults: 1+2+4+8+16+16 s: a 40 s outage is ridden out)")

    @model_validator(mode="after")
    def _coco_needs_json(self):
        if self.format == "coco" and not self.coco_json:
            raise ValueError("input.coco_json is required when input.format is 'coco'")
        if self.demo is not None and self.uri.rstrip("/").rsplit("/", 1)[-1] != "images":
            raise ValueError("input.uri must end in /images when input.demo is set "
                             "(demo data is written to its parent)")
        return self


class StorageSpec(_Strict):
    endpoint_url: str | None = None
    key: str | None = Field(None, repr=False)
    secret: str | None = Field(None, repr=False)
    region: str | None = None
    anon: bool = False


class OutputSpec(_Strict):
    uri: str
    lease_timeout_s: float | None = Field(
        None, gt=0, description="seconds without heartbeat before another run may take over the output's lease "
                                "(default: PSEUDOLABEL_LEASE_TIMEOUT_S, else 60)")


class OntologyEntry(_Strict):
    category: str
    prompts: list[str] = Field(default_factory=list, description="text prompts; default: the category name")
    semantic: bool = Field(False, description="stuff/part class (multitask checkpoints take a '[semantic] ' prefix)")
    token: str | list[str] | None = Field(
        None, description="word(s) of its prompts whose tokens carry the class, for labelers that read attention "
                          "to text tokens (iseg; [] = all tokens); default: the labeler's rule")
    id: int | None = Field(None, ge=1, description="category id; default: the next id not yet used in the job, "
                                                   "the same id wherever the same category name appears")
    score_threshold: float | None = Field(None, ge=0, le=1, description="exports drop this category's annotations "
                                                                        "scoring below it (labels keep them all)")
    _auto_id: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _default_prompt(self):
        if not self.prompts:
            self.prompts = [self.category]
        return self


#: what ``labelers[].device`` accepts (``cuda:N`` picks the N-th visible GPU)
DEVICES = "auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


class LabelerSpec(_Strict):
    name: str
    weights: str | None = Field(None, description="hub id, local directory or s3:// prefix")
    revision: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    ontology: list[OntologyEntry] = Field(default_factory=list)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = Field(False, description="torch.compile the labeler's network (worth it on a GPU for long "
                                             "runs); falls back to eager with a warning when compilation fails")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"{device!r} is not a device: use {DEVICES}")
        return device

    @model_validator(mode="after")
    def _ontology_ids(self):
        used = {e.id for e in self.ontology if e.id is not None}
        names = [e.category for e in self.ontology]
        if len(set(names)) != len(names):
            raise ValueError("ontology categories must be unique")
        next_id = 1
        for entry in self.ontology:
            if entry.id is None:
                while next_id in used:
                    next_id += 1
                entry.id = next_id
                entry._auto_id = True
                used.add(next_id)
        ids = [e.id for e in self.ontology]
        if len(set(ids)) != len(ids):
            raise ValueError("ontology ids must be unique")
        return self


class ResourcesSpec(_Strict):
    actors: int = Field(1, ge=1, description="labeler actors (max of the pool)")
    min_actors: int | None = Field(None, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(1, gt=0)
    batch_size: int = Field(8, ge=1)
    decode_batch_size: int = Field(16, ge=1)
    decode_cpus: float = Field(0.25, gt=0, description="CPUs reserved by each read and fetch+decode task")
    host_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each host task (labelers' post-processing, "
                                                    "encoding and the write; decoding too when no labeler has a "
                                                    "network): they run as many at once as the CPUs the actors "
                                                    "leave allow")
    host: Literal["tasks", "actor"] = Field(
        "tasks", description="where labelers' host halves (tokens, masks, encoding) run: parallel CPU tasks, so the "
                             "GPU never waits for them; or 'actor': inside the labeler's actor after its forward "
                             "pass (one call, as a labeler that only implements label)")
    rows_per_file: int | None = Field(None, ge=1, description="at most this many rows per output Parquet file")
    max_batch_pixels: int = Field(
        64_000_000, gt=0, description="memory budget: at most this many decoded pixels in one decode block or one "
                                      "labeler batch, and 3 bytes per pixel of labelers' prepared inputs in one "
                                      "block; larger batches are split (a single image larger than this still "
                                      "runs alone, up to input.max_pixels)")

    @model_validator(mode="after")
    def _min_actors_within_actors(self):
        if self.min_actors is not None and self.min_actors > self.actors:
            raise ValueError(f"resources.min_actors: {self.min_actors} is more than resources.actors "
                             f"({self.actors}); lower min_actors or raise actors")
        return self


class JobSpec(_Strict):
    name: str = "pseudolabel-job"
    input: InputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    output: OutputSpec
    labelers: list[LabelerSpec] = Field(min_length=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    seed: int = 0

    @model_validator(mode="after")
    def _one_category_numbering(self):
        """Category ids are job-wide: one name has one id and one id one name, across all labelers.

        Ids given in the spec are kept (a conflict is an error naming the field); the others are
        numbered in order, reusing the id of a name seen before.
        """
        id_of: dict[str, int] = {}
        name_of: dict[int, str] = {}
        for i, lab in enumerate(self.labelers):
            for j, entry in enumerate(lab.ontology):
                if entry._auto_id:
                    continue
                where = f"labelers.{i}.ontology.{j}.id"
                if name_of.get(entry.id, entry.category) != entry.category:
                    raise ValueError(f"{where}: id {entry.id} is already category {name_of[entry.id]!r}")
                if id_of.get(entry.category, entry.id) != entry.id:
                    raise ValueError(f"{where}: category {entry.category!r} already has id {id_of[entry.category]}")
                id_of[entry.category], name_of[entry.id] = entry.id, entry.category
        next_id = 1
        for lab in self.labelers:
            for entry in lab.ontology:
                if not entry._auto_id:
                    continue
                if entry.category not in id_of:
                    while next_id in name_of:
                        next_id += 1
                    id_of[entry.category], name_of[next_id] = next_id, entry.category
                entry.id = id_of[entry.category]
        return self


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if not loc:  # a whole-spec check already names its field
                lines.append(msg)
                continue
        if loc and msg.startswith(f"{loc}."):  # a section's check that names its own field
            lines.append(msg)
            continue
        lines.append(f"{loc or '<spec>'}: {msg}")
    return spec_problems(lines)


def spec_problems(lines: list[str]) -> str:
    """One line for the CLI: ``invalid job spec: <field>: <problem>; <field>: <problem>``."""
    return "invalid job spec: " + "; ".join(lines)


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars/lists/maps (``4``, ``true``, ``[a, b]``), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c = value`` in a nested dict/list structure, creating maps as needed."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise SpecError(f"{'.'.join(parts[:i + 1])}: no such list item") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise SpecError(f"{'.'.join(parts[:i])}: is a value, cannot set {part!r} inside it")


def _read_yaml(p: Path) -> Any:
    """A YAML file's content; an unreadable file or a syntax error is one SpecError line that says
    where (``file:line:column``, both counted from 1)."""
    try:
        text = p.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise SpecError(f"{p} is a folder: give the job spec's YAML file") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{p}: not a text file (byte {err.start} is not UTF-8): give the job spec's YAML "
                        f"file") from None
    except OSError as err:
        raise SpecError(f"cannot read {p}: {err.strerror or err}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = err.problem or "invalid YAML"
        if err.context and err.context_mark is not None and err.context_mark is not mark:
            problem += (f" ({err.context} that starts at line {err.context_mark.line + 1}, "
                        f"column {err.context_mark.column + 1})")
        elif err.context:
            problem += f" ({err.context})"
        raise SpecError(f"{where}: YAML syntax error: {' '.join(problem.split())}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: YAML syntax error: {' '.join(str(err).split())}") from None


def load_yaml_with_overrides(path: "str | Path | dict", overrides: dict[str, Any] | None = None) -> dict:
    """A YAML mapping (or dict) with dotted overrides applied; validation is the caller's."""
    if isinstance(path, dict):
        data = copy.deepcopy(path)
    else:
        p = Path(path)
        if not p.exists():
            raise SpecError(f"spec not found: {p}")
        data = _read_yaml(p) or {}
        if not isinstance(data, dict):
            raise SpecError(f"{p}: a spec is a YAML mapping")
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    return data


SpecModel = TypeVar("SpecModel", bound=BaseModel)


def validate_spec(model: type[SpecModel], spec: Any, overrides: dict[str, Any] | None = None) -> SpecModel:
    """Any spec model (job, training) from an instance, a dict or a YAML path, with dotted overrides.

    A validation error becomes a SpecError naming each bad field by its dotted path.
    """
    data = load_yaml_with_overrides(spec.model_dump() if isinstance(spec, BaseModel) else spec, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err)) from None
