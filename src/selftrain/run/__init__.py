"""A run folder and its life: layout, records, seeds, lock, resume, lineage and the loop."""
