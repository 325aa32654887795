"""Image-caption datasets: the shipped emoji32 set, image folders and webdataset shards."""
from stepdistill.data.emoji32 import ImageCaptionSet, load_emoji32

__all__ = ["ImageCaptionSet", "load_emoji32"]
