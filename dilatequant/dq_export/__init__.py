"""Graph side: q.pt -> a QDQ ONNX graph whose per-timestep activation scales are selected by t_index."""
