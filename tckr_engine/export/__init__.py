"""tckr_engine.export: ONNX export, ONNX Runtime sessions, TensorRT engines.

contract.py (ExportSpec, Exportable: the one export contract), modules.py (UNet and classifier wrappers),
onnx_export.py (trace, check, export.json, atomic folders), fp16.py (the fp16 cast pass), ort.py
(InferenceSession on CPU / CUDA / TensorRT providers), tensorrt.py (strongly typed engine build and runner),
cache.py (exports built on first use by the generate backends), api.py (`tckr-engine export`).
"""
