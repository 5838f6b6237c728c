# megatron-mmbert on an NGC PyTorch image: it ships PyTorch, TransformerEngine, Apex and flash-attn
# built together; they are NOT reinstalled here (reinstalling flash-attn breaks TE's pin).
#   docker build -t megatron-mmbert .
#   docker run --rm megatron-mmbert mmbert-pretrain --list-configs          # smoke test
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megatron-mmbert/runs megatron-mmbert \
#       torchrun --nproc_per_node 8 -m megatron_mmbert.pretrain --config mmbert-base --data.manifest ...
# Under Slurm + pyxis: examples/slurm/pretrain_pyxis.sbatch. .dockerignore keeps runs/, data, caches,
# .git and local builds out of the build context.
FROM nvcr.io/nvidia/pytorch:25.09-py3
WORKDIR /workspace/megatron-mmbert
COPY . .
# --no-deps for the image's own packages; the rest of our requirements come from setup.py. The
# install compiles the C++ index builder (pybind11) for the image's Python; the check imports it.
RUN pip install --no-cache-dir megatron-core==0.16.1 --no-deps \
 && pip install --no-cache-dir "pybind11>=2.12" \
 && pip install --no-cache-dir --no-build-isolation -e ".[hub]" \
 && python -c "import megatron_mmbert, megatron_mmbert.data._index_builder, transformer_engine, megatron.core; print('ok')" \
 && mmbert-pretrain --list-configs
