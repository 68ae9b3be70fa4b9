"""The TP x PP runner: one torchrun rank per process loads a converted checkpoint and generates greedily
(run.py); verify.py launches it and compares with Hugging Face fp32."""
