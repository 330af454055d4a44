"""Layer 3: deployment artifacts: ONNX export, fp16/int8 graphs, calibration sets, TensorRT engines."""
