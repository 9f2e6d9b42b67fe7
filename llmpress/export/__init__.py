"""Export for the edge: ONNX graphs checked against PyTorch in onnxruntime."""
