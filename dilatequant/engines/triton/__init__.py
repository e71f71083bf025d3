"""Triton Inference Server: model repository writer, config validation, server launcher and client."""
