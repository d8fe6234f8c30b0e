"""Image-to-sentence assignment for MMC4 shards (the crawler's companion worker)."""
