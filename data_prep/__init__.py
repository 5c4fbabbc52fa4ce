"""Command-line tools that turn real NIfTI data into fedjax_seg datasets."""
