#!/usr/bin/env bash
# End-to-end checks of the vit_moe program on a small synthetic IDX folder (8 x 8 images, 4
# classes: class c is a brightness level): train -> resume, a tiny compare that writes the report
# and the confusion matrix, and bad input: each error is one line on stderr that names the flag or
# file, with a non-zero exit and no crash.
# Usage: run.sh path/to/vit_moe
set -uo pipefail
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0

fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# write_split PREFIX COUNT SEED: a synthetic IDX split (class c: brightness level c).
source "$(dirname "${BASH_SOURCE[0]}")/synthetic_idx.sh"

mkdir -p "$work/data"
write_split "$work/data/train" 256 1
write_split "$work/data/t10k" 64 2
gzip -k "$work/data/t10k-images-idx3-ubyte" && rm "$work/data/t10k-images-idx3-ubyte"  # .gz and plain mixed

model=(--layers 2 --hidden 16 --heads 2 --ffn 24 --patch 4 --threads 2 --data "$work/data")
tiny=("${model[@]}" --experts 4 --batch 16 --warmup 2 --lr 1e-2)

# expect_error "what" "phrase the message must contain" args...
expect_error() {
  local what=$1 phrase=$2
  shift 2
  "$bin" "$@" >"$work/out" 2>"$work/err"
  local rc=$?
  if [[ $rc -eq 0 ]]; then fail "$what: exit 0"; return; fi
  if [[ $rc -ge 128 ]]; then fail "$what: crashed (exit $rc)"; return; fi
  if ! grep -q -- "$phrase" "$work/err"; then fail "$what: stderr lacks '$phrase': $(cat "$work/err")"; return; fi
  if [[ $(wc -l <"$work/err") -ne 1 ]]; then fail "$what: expected one error line, got: $(cat "$work/err")"; return; fi
  echo "ok: $what -> $(cat "$work/err")"
}

# ---- the happy path ----
"$bin" --help >"$work/help" 2>&1 && grep -q "compare" "$work/help" || fail "--help: $(cat "$work/help")"
"$bin" --help train >"$work/help" 2>&1 && grep -q -- "--augment" "$work/help" || fail "--help train: $(cat "$work/help")"
"$bin" train --variant self --steps 8 --augment on --checkpoint-every 4 "${tiny[@]}" --out "$work/run" \
  >"$work/train.log" 2>&1 || fail "train: $(tail -3 "$work/train.log")"
[[ -s $work/run/self.safetensors ]] || fail "train wrote no checkpoint"
grep -q "test top-1" "$work/train.log" || fail "train printed no accuracy: $(cat "$work/train.log")"
grep -q "peak resident memory" "$work/train.log" || fail "train printed no peak memory"
"$bin" train --resume "$work/run/self.safetensors" --steps 12 --data "$work/data" --threads 1 \
  >"$work/resume.log" 2>&1 || fail "resume: $(tail -3 "$work/resume.log")"
grep -q "from step 8 of 12" "$work/resume.log" || fail "resume did not start at step 8: $(cat "$work/resume.log")"
"$bin" train --variant linear --epochs 1 "${tiny[@]}" --out "$work/epochs" >"$work/epochs.log" 2>&1 ||
  fail "train --epochs: $(tail -3 "$work/epochs.log")"
grep -q "16 steps of 16 images" "$work/epochs.log" || fail "--epochs 1 is not 256 / 16 steps: $(head -1 "$work/epochs.log")"

"$bin" compare --variants dense,self,linear --steps 100 "${tiny[@]}" --out "$work/report" \
  >"$work/compare.log" 2>&1 || fail "compare: $(tail -3 "$work/compare.log")"
for f in report.md routing.csv routing.json entropy.svg max_fraction.svg heatmap_self.svg heatmap_linear.svg \
         confusion.svg dense.safetensors self.safetensors linear.safetensors; do
  [[ -s $work/report/$f ]] || fail "compare did not write $f"
done
grep -q "| self" "$work/compare.log" || fail "compare did not print the table"
grep -q "test top-1 .* images/s |" "$work/compare.log" || fail "the table lacks its columns: $(grep variant "$work/compare.log")"
grep -q "confusion.svg" "$work/report/report.md" || fail "report.md does not show the confusion matrix"
# The brightness task is easy: every variant learns it (chance: 0.25).
while read -r variant accuracy; do
  awk -v a="$accuracy" 'BEGIN { exit !(a > 0.7) }' || fail "$variant: test top-1 $accuracy <= 0.7 on the brightness task"
done < <(grep -E '^\| (dense|self|linear) ' "$work/compare.log" | awk -F'|' '{ gsub(/ /, ""); print $2, $5 }')
# Per-layer routing: one MoE block (block 1) x 4 experts per MoE variant.
[[ $(grep -c '^self,0,' "$work/report/routing.csv") -eq 4 ]] || fail "routing.csv: $(cat "$work/report/routing.csv")"
# Each expert's logit for norm2's bias: self's measured (a number in the last column).
grep -q '^self,0,0,.*,-\?[0-9][0-9.e-]*$' "$work/report/routing.csv" ||
  fail "routing.csv: no bias logit for self: $(grep '^self,0,0,' "$work/report/routing.csv")"

# Over seeds: each seed's report in seed-<s>/, the summary (mean ± std, differences from linear) on top.
"$bin" compare --variants self,linear --seeds 3,4 --steps 4 "${tiny[@]}" --out "$work/seeds" \
  >"$work/seeds.log" 2>&1 || fail "compare --seeds: $(tail -3 "$work/seeds.log")"
for f in report.md summary.json seed-3/report.md seed-3/confusion.svg seed-4/routing.json; do
  [[ -s $work/seeds/$f ]] || fail "compare --seeds did not write $f"
done
grep -q "^| self | .* ± " "$work/seeds.log" || fail "compare --seeds printed no mean ± std: $(cat "$work/seeds.log")"
grep -q '"test top-1": {"mean": ' "$work/seeds/summary.json" || fail "summary.json lacks test top-1"
# --no-checkpoint: the figures without the checkpoints (a comparison over many seeds would write one per run).
"$bin" compare --variants self,linear --seeds 3,4 --steps 4 "${tiny[@]}" --no-checkpoint --out "$work/seeds_only" \
  >"$work/seeds_only.log" 2>&1 || fail "compare --seeds --no-checkpoint: $(tail -3 "$work/seeds_only.log")"
[[ -s $work/seeds_only/seed-4/report.md ]] || fail "compare --no-checkpoint wrote no report"
[[ -z $(find "$work/seeds_only" -name '*.safetensors') ]] || fail "compare --no-checkpoint wrote a checkpoint"
"$bin" train --variant linear --steps 2 "${tiny[@]}" --no-checkpoint --out "$work/nockpt" >"$work/nockpt.log" 2>&1 ||
  fail "train --no-checkpoint: $(tail -3 "$work/nockpt.log")"
grep -q "checkpoint none" "$work/nockpt.log" || fail "train --no-checkpoint did not say so: $(cat "$work/nockpt.log")"
[[ ! -e $work/nockpt ]] || fail "train --no-checkpoint made its --out folder"

# --device: the GPU's code on the emulated device (what --device cuda runs), its checkpoint resumed on
# the CPU, and a CPU checkpoint resumed there in bf16.
"$bin" train --variant self --steps 6 "${tiny[@]}" --device emulated --out "$work/dev" >"$work/dev.log" 2>&1 ||
  fail "train --device emulated: $(tail -3 "$work/dev.log")"
grep -q "on emulated CUDA device" "$work/dev.log" || fail "train --device emulated did not say where: $(cat "$work/dev.log")"
[[ -s $work/dev/self.safetensors ]] || fail "train --device emulated wrote no checkpoint"
"$bin" train --resume "$work/dev/self.safetensors" --steps 8 --data "$work/data" >"$work/dev_cpu.log" 2>&1 ||
  fail "resume on the CPU: $(tail -3 "$work/dev_cpu.log")"
grep -q "from step 6 of 8" "$work/dev_cpu.log" || fail "resume on the CPU: $(cat "$work/dev_cpu.log")"
"$bin" train --resume "$work/run/self.safetensors" --steps 14 --data "$work/data" --device emulated --precision bf16 \
  --out "$work/dev_bf16" >"$work/dev_bf16.log" 2>&1 || fail "resume in bf16: $(tail -3 "$work/dev_bf16.log")"
grep -q "bf16 (fp32 master weights)" "$work/dev_bf16.log" || fail "resume in bf16: $(cat "$work/dev_bf16.log")"
# The fused attention in bf16 (head size 32 fits it), as --device cuda would run it; the report says where.
"$bin" compare --variants linear --steps 3 --layers 2 --hidden 64 --heads 2 --ffn 24 --patch 4 --threads 2 \
  --data "$work/data" --experts 4 --batch 16 --warmup 1 --device emulated --precision bf16 --attention fused \
  --no-checkpoint --out "$work/fused" >"$work/fused.log" 2>&1 || fail "compare --attention fused: $(tail -3 "$work/fused.log")"
grep -q "Trained on emulated CUDA device.*bf16.*fused attention where it fits" "$work/fused/report.md" ||
  fail "the fused run's report does not say where it trained: $(grep -i trained "$work/fused/report.md")"
grep -q "| peak allocated |" "$work/fused/report.md" && grep -q "| [0-9.]* MiB |" "$work/fused/report.md" ||
  fail "the device run's report has no peak device memory: $(grep '^|' "$work/fused/report.md" | head -3)"

# ---- bad input ----
expect_error "unknown subcommand" "unknown subcommand 'fly'" fly
expect_error "unknown device" "--device must be cpu, cuda or emulated" train "${tiny[@]}" --device tpu
expect_error "bf16 on the CPU" "--precision bf16 needs --device cuda" train "${tiny[@]}" --precision bf16
expect_error "tf32 emulated" "--precision tf32 needs --device cuda" compare "${tiny[@]}" --device emulated --precision tf32
expect_error "cuda without a GPU or CUDA" "--device cuda" train "${tiny[@]}" --steps 4 --device cuda
expect_error "attention on the CPU" "--attention needs --device cuda or emulated" train "${tiny[@]}" --attention fused
expect_error "unknown attention" "--attention must be fused or materialized, got 'flash'" train "${tiny[@]}" \
  --device emulated --attention flash
expect_error "unknown flag" "unknown flag --colour" train --colour red
expect_error "flag of another subcommand" "--variants does not apply" train --variants self
expect_error "unknown variant" "unknown variant 'learned'" train --variant learned --data "$work/data"
expect_error "unknown variant in a list" "unknown variant 'slef'" compare --variants self,slef
expect_error "one seed" "--seeds needs at least two seeds" compare --seeds 5
expect_error "seed and seeds" "give --seed or --seeds, not both" compare --seed 1 --seeds 5,6
expect_error "bad integer" "--steps expects an integer" train --steps ten
expect_error "bad number" "--lr expects a number" train --lr fast
expect_error "missing value" "--steps needs a value" train --steps
expect_error "steps and epochs" "--steps or --epochs" train "${tiny[@]}" --steps 3 --epochs 1
expect_error "bad augment" "--augment must be on or off" train "${tiny[@]}" --augment maybe
expect_error "bad config" "--config must be small or deit-s16" train "${tiny[@]}" --config huge
expect_error "patch does not divide" "--patch 3 does not divide the 8 x 8 images" train --data "$work/data" --patch 3
expect_error "deit-s16 on 8 x 8 images" "--patch 16 does not divide" train --config deit-s16 --data "$work/data"
expect_error "SelfRoute N > H" "hidden size H = 16" train "${model[@]}" --experts 32 --variant self
expect_error "top-k > N" "--top-k 5 exceeds --experts 4" train "${tiny[@]}" --top-k 5
expect_error "batch too large" "--batch 1000 is larger than the training split" train "${model[@]}" --batch 1000
expect_error "missing data folder" "does-not-exist" train --data "$work/does-not-exist"
mkdir -p "$work/empty"
expect_error "folder without IDX files" "has no train-images-idx3-ubyte" train --data "$work/empty"
cp -r "$work/data" "$work/truncated"
head -c 1000 "$work/data/train-images-idx3-ubyte" >"$work/truncated/train-images-idx3-ubyte"
expect_error "truncated IDX" "truncated/train-images-idx3-ubyte is truncated" train --data "$work/truncated"
cp -r "$work/data" "$work/badgz"
head -c 200 "$work/data/t10k-images-idx3-ubyte.gz" >"$work/badgz/t10k-images-idx3-ubyte.gz"
expect_error "truncated gzip" "badgz/t10k-images-idx3-ubyte.gz" train --data "$work/badgz"
cp -r "$work/data" "$work/magic"
printf '\x00\x00\x08\x01' | dd of="$work/magic/train-images-idx3-ubyte" bs=1 seek=0 conv=notrunc status=none
expect_error "wrong IDX magic" "magic number 0x00000801" train --data "$work/magic"
cp -r "$work/data" "$work/fewlabels"
head -c 100 "$work/data/train-labels-idx1-ubyte" >"$work/fewlabels/train-labels-idx1-ubyte"
expect_error "labels and images disagree" "fewlabels/train-labels-idx1-ubyte" train --data "$work/fewlabels"
expect_error "missing checkpoint" "nothing.safetensors" train --resume "$work/nothing.safetensors" --data "$work/data"
head -c 100 "$work/run/self.safetensors" >"$work/truncated.safetensors"
expect_error "truncated checkpoint" "truncated.safetensors" train --resume "$work/truncated.safetensors" --data "$work/data"
head -c 20000 "$work/run/self.safetensors" >"$work/short.safetensors"
expect_error "checkpoint cut in its data" "short.safetensors" train --resume "$work/short.safetensors" --data "$work/data"
expect_error "resume changes the model" "--hidden cannot change a resumed run" \
  train --resume "$work/run/self.safetensors" --data "$work/data" --hidden 32
mkdir -p "$work/other"
write_split "$work/other/train" 256 7
cp "$work/data/t10k-labels-idx1-ubyte" "$work/data/t10k-images-idx3-ubyte.gz" "$work/other/"
expect_error "resume on other data" "differs" train --resume "$work/run/self.safetensors" --data "$work/other"
# A checkpoint whose augmentation option is neither on nor off (the value edited in place: same length).
LC_ALL=C sed 's/"train\.augment":"on"/"train.augment":"ja"/' "$work/run/self.safetensors" >"$work/bad_augment.safetensors"
expect_error "resume with a bad train.augment" 'metadata "train.augment" = "ja" is not on or off' \
  train --resume "$work/bad_augment.safetensors" --data "$work/data"
# Saved options that no command line could give (a negative rate): the file's error, not a flag's.
LC_ALL=C sed 's/"train\.lr":"0\.01"/"train.lr":"-0.1"/' "$work/run/self.safetensors" >"$work/bad_lr.safetensors"
expect_error "resume with a negative saved rate" "bad_lr.safetensors: the training options in its metadata are not valid" \
  train --resume "$work/bad_lr.safetensors" --data "$work/data"
# Refused before any training (they used to be found after it, or not at all).
expect_error "a variant twice" "--variants lists 'self' twice" compare "${tiny[@]}" --variants self,linear,self
model1=(--layers 1 --hidden 16 --heads 2 --ffn 24 --patch 4 --threads 2 --data "$work/data")
expect_error "an MoE variant without an MoE block" "variant 'self' needs an MoE block" \
  train "${model1[@]}" --variant self --steps 2
expect_error "an --out under a file" "cannot make the output folder" \
  compare "${tiny[@]}" --variants dense --steps 3 --out "$work/data/train-labels-idx1-ubyte/report"

if [[ $failures -ne 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all vit_moe command-line checks passed"
