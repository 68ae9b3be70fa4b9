"""Engines built from the pipeline's artifacts by NVIDIA's compilers: TensorRT from the ONNX decoder
(trt_build.py), TensorRT-LLM's trtllm-build from the converted checkpoint (trtllm_build.py). The code that
drives the libraries is thin; what it does is decided by plain data built from params.yaml, tested without them."""
