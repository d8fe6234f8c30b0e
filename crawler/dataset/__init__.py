"""The crawled corpus as a dataset: its index, the dataset API and the training export.

``index`` turns each rewritten shard and its status report into files under
``OUTPUT/_dataset/`` when the shard's rewrite completes; ``api`` serves them over HTTP;
``export`` writes WebDataset tar shards from them; ``auth`` holds the bearer tokens.
"""
