#!/usr/bin/env bash
# Sourced: write_split, a synthetic Fashion-MNIST-shaped IDX split of 8 x 8 one-channel images in 4
# classes (class c is a brightness level, 30 + 50 c plus noise), learnable in a few steps. Used by
# the vit_moe command-line tests (run.sh) and the GPU run's ViT smoke (bench/gpu/run.sh), where
# no dataset can be downloaded.

# be32 N: N as 4 big-endian bytes.
be32() { printf "\\x$(printf %02x $(($1 >> 24 & 255)))\\x$(printf %02x $(($1 >> 16 & 255)))\\x$(printf %02x $(($1 >> 8 & 255)))\\x$(printf %02x $(($1 & 255)))"; }

# write_split PREFIX COUNT SEED: PREFIX-images-idx3-ubyte and PREFIX-labels-idx1-ubyte.
write_split() {
  local prefix=$1 count=$2 seed=$3
  { printf '\x00\x00\x08\x03'; be32 "$count"; be32 8; be32 8
    LC_ALL=C awk -v n="$count" -v seed="$seed" 'BEGIN { srand(seed)
      for (i = 0; i < n; i++) { c = i % 4
        for (j = 0; j < 64; j++) printf "%c", 30 + 50 * c + int(rand() * 40) } }'
  } >"${prefix}-images-idx3-ubyte"
  { printf '\x00\x00\x08\x01'; be32 "$count"
    LC_ALL=C awk -v n="$count" 'BEGIN { for (i = 0; i < n; i++) printf "%c", 48 + i % 4 }' | tr '0123' '\000\001\002\003'
  } >"${prefix}-labels-idx1-ubyte"
}
