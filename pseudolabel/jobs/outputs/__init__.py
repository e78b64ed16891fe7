"""Reading a run back: the labels table, exports for other tools, and the visual report."""
