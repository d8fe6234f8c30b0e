"""mmc4-crawler: MMC4 shards -> Redis work queue -> async fetch workers -> local images."""

__version__ = "0.1.0"
