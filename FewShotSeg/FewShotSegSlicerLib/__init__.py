"""Slicer-side helpers of FewShotSeg: small classes with no Qt, usable from tests and the console."""
