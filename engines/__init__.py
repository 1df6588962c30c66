"""Engine folders: manifest, files, TensorRT plans and lint (``dyvte.engines``)."""
