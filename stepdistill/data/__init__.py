"""Image-caption datasets: the shipped emoji32 set, image folders and webdataset shards."""
from stepdistill.data.emoji32 import ImageCaptionSet, load_emoji32
from stepdistill.data.loaders import load_dataset, load_imagefolder, load_webdataset

__all__ = ["ImageCaptionSet", "load_dataset", "load_emoji32", "load_imagefolder", "load_webdataset"]
