#!/usr/bin/env bash
# Multi-node pruning/recovery with torchrun (no SLURM). Run this same script on every node, changing only
# NODE_RANK (0 on the main node). Lightning detects torchrun's environment and starts no processes itself,
# so trainer.devices/num_nodes below must match --nproc_per_node/--nnodes.
set -euo pipefail

NNODES=${NNODES:-2}                 # machines
GPUS_PER_NODE=${GPUS_PER_NODE:-8}   # processes per machine, one per GPU
NODE_RANK=${NODE_RANK:?set NODE_RANK=0 on the main node, 1..NNODES-1 on the others}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the address of the main node}
MASTER_PORT=${MASTER_PORT:-29500}
RECIPE=${RECIPE:-recipes/mosaic-50.yaml}
STRATEGY=${STRATEGY:-configs/zero3.yaml}   # or configs/ddp.yaml, configs/zero2.yaml, configs/zero3-offload.yaml

torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  train.py fit --config "$RECIPE" --config "$STRATEGY" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" "$@"
