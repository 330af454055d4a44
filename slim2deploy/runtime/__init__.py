"""Layer 4: one runner interface (activate / infer / deactivate) over ONNX Runtime, torch and TensorRT.

Torch-free except the torch runner.
"""
