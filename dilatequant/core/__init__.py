"""What every side uses: models and pipeline folders, conditioning, sampling, metrics, reporting and io, errors."""
