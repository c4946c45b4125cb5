"""Data in and out: standard referring-segmentation datasets as manifests, manifests as
Text4Seg training conversations."""
