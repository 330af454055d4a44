"""Layer 4: one runner interface (activate / infer / deactivate) over ONNX Runtime, torch and TensorRT.

``base`` (the interface), one module per runtime (``ort``, ``torch``, ``trt``) and ``registry``
(file type -> runner, loaded lazily). Torch-free except ``torch``.
"""
