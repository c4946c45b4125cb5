"""text4seg-demo: Text4Seg segmentation as text generation, from codec to web demo."""

__version__ = "0.1.0"
