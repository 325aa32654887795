"""Image-caption datasets: the shipped emoji32 set, image folders and webdataset shards."""
from stepdistill.data.emoji32 import ImageCaptionSet, load_emoji32
from stepdistill.data.loaders import SampleSource, load_dataset, load_imagefolder, load_webdataset, open_dataset

__all__ = ["ImageCaptionSet", "SampleSource", "load_dataset", "load_emoji32", "load_imagefolder", "load_webdataset",
           "open_dataset"]
