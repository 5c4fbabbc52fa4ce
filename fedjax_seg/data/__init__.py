"""Data: synthetic multi-site slices, NIfTI reading, TFDS datasets, site arrays.

Knows nothing about privacy or federation.
"""
