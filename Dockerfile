# megatron-mmbert on an NGC PyTorch image: it ships PyTorch, TransformerEngine, Apex and flash-attn
# built together; they are NOT reinstalled here (reinstalling flash-attn breaks TE's pin).
#   docker build -t megatron-mmbert .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megatron-mmbert/runs megatron-mmbert \
#       torchrun --nproc_per_node 8 pretrain_mmbert.py --config examples/configs/mmbert_base.yaml
FROM nvcr.io/nvidia/pytorch:25.09-py3
WORKDIR /workspace/megatron-mmbert
COPY . .
# --no-deps for the image's own packages; the rest of our requirements come from setup.py.
RUN pip install --no-cache-dir megatron-core==0.16.1 --no-deps \
 && pip install --no-cache-dir --no-build-isolation -e . \
 && python -c "import megatron_mmbert, transformer_engine, megatron.core; print('ok')"
