"""Slicer's GUI layer reproduced for tests: real Qt (PySide6), real MRML (slicer-core),
Slicer's own slicer.util, and stand-ins for PythonQt and Slicer's C++ widgets."""
