"""Data: task specs and readers (``sources``), tokenization and bucketed batches (``pipeline``)."""
