"""Training side: models, sampling, metrics and DilateQuant calibration up to the checkpoint q.pt."""
