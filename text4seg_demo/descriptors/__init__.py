"""The text format: semantic descriptors (R-RLE, full-length), the answer grammar and the prompts.

Plain Python and numpy only, so that reading and writing answers never loads a model stack."""
