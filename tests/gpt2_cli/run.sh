#!/usr/bin/env bash
# End-to-end checks of the gpt2_moe program: a tiny train -> resume -> sample -> tokenize -> train on
# shards round trip, a tiny compare that writes a report, and bad input: each error is one line on
# stderr that names the flag or file, with a non-zero exit and no crash.
# Usage: run.sh path/to/gpt2_moe
set -uo pipefail
bin=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0

fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# A small corpus: fortune-style documents separated by % lines.
mkdir -p "$work/corpus"
for i in $(seq 1 300); do
  printf 'The quick brown fox %d jumps over the lazy dog.\nA stitch in time saves nine; number %d.\n%%\n' "$i" "$i"
done >"$work/corpus/sayings"

tiny=(--layers 2 --hidden 32 --heads 2 --ffn 48 --experts 4 --context 32 --seq 32 --batch 4
      --eval-tokens 256 --stats-tokens 512 --threads 2)

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
"$bin" train --variant self --steps 4 --warmup 1 "${tiny[@]}" --data "$work/corpus" --out "$work/run" \
  >"$work/train.log" 2>&1 || fail "train: $(tail -3 "$work/train.log")"
[[ -s $work/run/self.safetensors ]] || fail "train wrote no checkpoint"
"$bin" train --resume "$work/run/self.safetensors" --steps 6 --data "$work/corpus" --threads 1 \
  >"$work/resume.log" 2>&1 || fail "resume: $(tail -3 "$work/resume.log")"
grep -q "from step 4 of 6" "$work/resume.log" || fail "resume did not start at step 4: $(cat "$work/resume.log")"
# A resume writing elsewhere (--out): its checkpoint there, the original left as it was.
"$bin" train --resume "$work/run/self.safetensors" --steps 7 --data "$work/corpus" --out "$work/resumed" \
  >"$work/resume_out.log" 2>&1 || fail "resume --out: $(tail -3 "$work/resume_out.log")"
[[ -s $work/resumed/self.safetensors ]] || fail "resume --out wrote no checkpoint in its folder"
# A run without a checkpoint makes no folder.
"$bin" train --variant self --steps 1 --warmup 0 "${tiny[@]}" --data "$work/corpus" --no-checkpoint \
  --out "$work/no_folder" >"$work/nockpt.log" 2>&1 || fail "train --no-checkpoint: $(tail -3 "$work/nockpt.log")"
[[ ! -e $work/no_folder ]] || fail "train --no-checkpoint made its --out folder"
# The log names the threads the run uses (--threads 1), not the default it was built with.
grep -q "cpu, 1 threads" "$work/resume.log" || fail "resume's log does not name --threads 1: $(head -2 "$work/resume.log")"
"$bin" sample --checkpoint "$work/run/self.safetensors" --prompt "The " --tokens 20 >"$work/sample.txt" 2>&1 ||
  fail "sample: $(cat "$work/sample.txt")"
grep -q "^The " "$work/sample.txt" || fail "sample does not continue the prompt: $(cat "$work/sample.txt")"
"$bin" tokenize --data "$work/corpus" --out "$work/shards" >"$work/tok.log" 2>&1 || fail "tokenize: $(cat "$work/tok.log")"
[[ -s $work/shards/train_000000.bin && -s $work/shards/val_000000.bin ]] || fail "tokenize wrote no shards"
"$bin" train --variant linear --steps 2 --warmup 1 "${tiny[@]}" --data "$work/shards" --out "$work/run2" \
  >"$work/shards.log" 2>&1 || fail "train on shards: $(tail -3 "$work/shards.log")"
"$bin" compare --variants self,random,dense --steps 3 --warmup 1 "${tiny[@]}" --data "$work/corpus" \
  --out "$work/the report" >"$work/compare.log" 2>&1 || fail "compare: $(tail -3 "$work/compare.log")"
for f in report.md routing.csv routing.json entropy.svg max_fraction.svg heatmap_self.svg; do
  [[ -s "$work/the report/$f" ]] || fail "compare did not write $f"
done
# The report gives the command as a shell runs it again: the folder with a space in quotes.
grep -qF -- "--out '$work/the report'" "$work/the report/report.md" ||
  fail "the report's command line does not quote --out: $(grep -A3 'Produced by' "$work/the report/report.md")"
grep -q "| self" "$work/compare.log" || fail "compare did not print the table"
# Each expert's logit for ln_2's bias: self's measured (a number in the last column), Random's n/a (empty).
csv="$work/the report/routing.csv"
head -1 "$csv" | grep -qx "variant,layer,expert,fraction,logit_mean,logit_std,bias_logit" ||
  fail "routing.csv's header: $(head -1 "$csv")"
grep -q '^self,0,0,.*,-\?[0-9][0-9.e-]*$' "$csv" || fail "routing.csv: no bias logit for self: $(grep '^self,0,0,' "$csv")"
grep -q '^random,0,0,.*,$' "$csv" || fail "routing.csv: a bias logit for random: $(grep '^random,0,0,' "$csv")"
grep -q "the part the bias of the LayerNorm before the gate" "$work/the report/report.md" || fail "report.md has no bias table"
# Over seeds: each seed's report in seed-<s>/, the summary (mean ± std, differences from linear) on top.
"$bin" compare --variants self,linear,dense --seeds 7,8 --steps 2 --warmup 1 "${tiny[@]}" --data "$work/corpus" \
  --no-checkpoint --out "$work/seeds" >"$work/seeds.log" 2>&1 || fail "compare --seeds: $(tail -3 "$work/seeds.log")"
for f in report.md summary.json seed-7/report.md seed-7/entropy.svg seed-8/routing.json; do
  [[ -s $work/seeds/$f ]] || fail "compare --seeds did not write $f"
done
grep -q "^| self | .* ± " "$work/seeds.log" || fail "compare --seeds printed no mean ± std: $(cat "$work/seeds.log")"
grep -q "^| variant − linear |" "$work/seeds.log" || fail "compare --seeds printed no differences from linear"
grep -q '"seeds": \[7, 8\]' "$work/seeds/summary.json" || fail "summary.json lacks the seeds"
grep -q "seed 8" "$work/seeds/seed-8/report.md" || fail "seed-8's report does not name its seed"
# A comparison run apart (as GPU sessions run the gates): other gates with the same budget in their
# own folder, then one report of both runs. self-per-layer sits beside the first run's self (the
# same model description: the slices are in the variant's name).
"$bin" compare --variants linear,self-per-layer --steps 3 --warmup 1 "${tiny[@]}" --data "$work/corpus" \
  --no-checkpoint --out "$work/apart" >"$work/apart.log" 2>&1 || fail "compare (apart): $(tail -3 "$work/apart.log")"
"$bin" report --from "$work/the report,$work/apart" --out "$work/merged" >"$work/merged.log" 2>&1 ||
  fail "report --from: $(tail -3 "$work/merged.log")"
for v in self random dense linear self-per-layer; do
  grep -q "^| $v " "$work/merged/report.md" || fail "the merged report lacks $v: $(cat "$work/merged/report.md")"
done
for v in linear self self-per-layer; do
  [[ -s $work/merged/heatmap_$v.svg ]] || fail "the merged report drew no heatmap of $v"
done
grep -q -- "--variants linear,self-per-layer" "$work/merged/report.md" ||
  fail "the merged report lacks the second run's command"

# ---- devices: the GPU's code on the host (--device emulated), bf16 with fp32 master weights,
# resumed on the CPU; a compare there too ----
"$bin" train --variant linear --device emulated --precision bf16 --steps 2 --warmup 1 "${tiny[@]}" \
  --data "$work/corpus" --out "$work/emulated" >"$work/emulated.log" 2>&1 ||
  fail "train --device emulated: $(tail -3 "$work/emulated.log")"
grep -q "on emulated CUDA device (host loops), bf16" "$work/emulated.log" ||
  fail "train --device emulated did not say where it trains: $(head -3 "$work/emulated.log")"
grep -q "device memory allocated by the model at its peak: [0-9.]* MiB" "$work/emulated.log" ||
  fail "train --device emulated did not report its peak device memory: $(tail -5 "$work/emulated.log")"
"$bin" train --resume "$work/emulated/linear.safetensors" --steps 3 --data "$work/corpus" \
  >"$work/emulated_resume.log" 2>&1 || fail "CPU resume of a bf16 device checkpoint: $(tail -3 "$work/emulated_resume.log")"
grep -q "from step 2 of 3 on cpu" "$work/emulated_resume.log" ||
  fail "the CPU resume did not start at step 2: $(cat "$work/emulated_resume.log")"
# Per-layer self slices: kept in the device checkpoint, and the CPU resume builds the same gates.
"$bin" train --variant self-per-layer --device emulated --precision bf16 --steps 2 --warmup 1 \
  "${tiny[@]}" --data "$work/corpus" --out "$work/slices" >"$work/slices.log" 2>&1 ||
  fail "train --variant self-per-layer: $(tail -3 "$work/slices.log")"
head -c 4096 "$work/slices/self-per-layer.safetensors" | grep -aq '"config.self_slice": *"per-layer"' ||
  fail "the checkpoint does not record the per-layer slices"
head -c 4096 "$work/slices/self-per-layer.safetensors" | grep -aq '"variant": *"self"' ||
  fail "the checkpoint does not hold the self FFN"
"$bin" train --resume "$work/slices/self-per-layer.safetensors" --steps 3 --data "$work/corpus" \
  >"$work/slices_resume.log" 2>&1 || fail "CPU resume with per-layer slices: $(tail -3 "$work/slices_resume.log")"
grep -q "resuming self-per-layer from step 2 of 3" "$work/slices_resume.log" ||
  fail "the resume does not name the per-layer variant: $(head -3 "$work/slices_resume.log")"
"$bin" compare --variants self,dense --device emulated --steps 2 --warmup 1 "${tiny[@]}" --data "$work/corpus" \
  --no-checkpoint --out "$work/emulated_report" >"$work/emulated_compare.log" 2>&1 ||
  fail "compare --device emulated: $(tail -3 "$work/emulated_compare.log")"
[[ ! -e $work/emulated_report/self.safetensors ]] || fail "compare --no-checkpoint wrote a checkpoint"
grep -q "Trained on emulated CUDA device" "$work/emulated_report/report.md" ||
  fail "the report does not say where the variants trained"
# --device cuda: trains where there is a GPU; elsewhere one error line naming the flag.
if "$bin" train --variant self --device cuda --steps 2 --warmup 1 "${tiny[@]}" --data "$work/corpus" \
  --out "$work/cuda" >"$work/cuda.log" 2>&1; then
  echo "ok: --device cuda trained on this machine's GPU"
else
  expect_error "no GPU for --device cuda" "--device cuda" train --variant self --device cuda --steps 2 "${tiny[@]}" \
    --data "$work/corpus"
fi

# ---- bad input ----
expect_error "unknown subcommand" "unknown subcommand 'fly'" fly
expect_error "report without runs" "--from DIRS" report
expect_error "report of a gate twice" "is in more than one of the runs" report --from "$work/the report,$work/apart,$work/apart"
expect_error "report of unlike runs" "another budget" report --from "$work/the report,$work/seeds/seed-7"
expect_error "report of no comparison" "corpus/routing.json" report --from "$work/corpus"
expect_error "unknown flag" "unknown flag --colour" train --colour red
expect_error "unknown variant" "unknown variant 'learned'" train --variant learned --data "$work/corpus"
expect_error "unknown variant in a list" "unknown variant 'slef'" compare --variants self,slef
expect_error "one seed" "--seeds needs at least two seeds" compare --seeds 5
expect_error "a seed twice" "--seeds lists 5 twice" compare --seeds 5,6,5
expect_error "bad seed" "--seeds item 'x' is not a non-negative integer" compare --seeds 5,x
expect_error "seed and seeds" "give --seed or --seeds, not both" compare --seed 1 --seeds 5,6
expect_error "unknown device" "--device must be cpu, cuda or emulated" train --device gpu --data "$work/corpus"
expect_error "unknown variant's list" "(valid: dense, linear, self, self-per-layer, fixed-random, random)" \
  train --variant self-first --data "$work/corpus"
expect_error "a variant twice" "--variants lists 'self' twice" compare --variants self,linear,self
expect_error "the retired slice flag" "unknown flag --self-slice" train --self-slice per-layer --data "$work/corpus"
expect_error "unknown precision" "--precision must be fp32, tf32 or bf16" train --precision fp16 --data "$work/corpus"
# Refused before the data loads (a missing corpus would be the error otherwise).
expect_error "bf16 on the CPU" "--precision bf16 needs --device cuda" train --precision bf16 --data "$work/no-corpus"
expect_error "tf32 on the emulated device" "--precision tf32 needs --device cuda" compare --device emulated \
  --precision tf32 --data "$work/no-corpus"
expect_error "bf16 on the CPU, resumed" "--precision bf16 needs --device cuda" train --resume "$work/no.safetensors" \
  --precision bf16
expect_error "bad integer" "--steps expects an integer" train --steps ten
expect_error "missing value" "--steps needs a value" train --steps
expect_error "SelfRoute N > H" "hidden size H = 32" train --experts 64 --hidden 32 --heads 2 --data "$work/corpus"
expect_error "missing corpus" "does-not-exist" train --data "$work/does-not-exist"
mkdir -p "$work/empty"
expect_error "empty corpus" "$work/empty" train "${tiny[@]}" --data "$work/empty"
expect_error "missing checkpoint" "nothing.safetensors" sample --checkpoint "$work/nothing.safetensors"
head -c 100 "$work/run/self.safetensors" >"$work/truncated.safetensors"
expect_error "truncated checkpoint" "truncated.safetensors" sample --checkpoint "$work/truncated.safetensors"
printf 'garbage!' >"$work/bad.bin"
expect_error "corrupt shard" "bad.bin" train "${tiny[@]}" --data "$work/bad.bin"
cp "$work/shards/train_000000.bin" "$work/wrongmagic.bin"
printf '\x01\x02\x03\x04' | dd of="$work/wrongmagic.bin" bs=1 seek=0 conv=notrunc status=none
expect_error "wrong shard magic" "magic" train "${tiny[@]}" --data "$work/wrongmagic.bin"
mkdir -p "$work/other"
for i in $(seq 1 300); do printf 'Completely different text, part %d.\n%%\n' "$i"; done >"$work/other/text"
expect_error "resume on other data" "differs" train --resume "$work/run/self.safetensors" --data "$work/other"
# A checkpoint whose training options lack the learning rate (the key renamed in place: same length).
LC_ALL=C sed 's/"train\.lr"/"train.LR"/' "$work/run/self.safetensors" >"$work/no_lr.safetensors"
expect_error "resume without train.lr" 'no_lr.safetensors: metadata has no "train.lr"' \
  train --resume "$work/no_lr.safetensors" --data "$work/corpus"

# Misuse that used to be taken: model flags on a resume (ignored), a missing value (the next flag
# became a folder), a list's trailing comma, an empty --data (the default corpus), an --out that cannot
# be a folder (found only after training), a merged report over one of its runs.
expect_error "a model flag on a resume" "--hidden cannot change a resumed run" \
  train --resume "$work/run/self.safetensors" --hidden 64 --data "$work/corpus"
expect_error "a variant on a resume" "--variant cannot change a resumed run" \
  train --resume "$work/run/self.safetensors" --variant linear --data "$work/corpus"
expect_error "a forgotten value" "--out needs a value (DIR), got the flag '--no-checkpoint'" \
  train "${tiny[@]}" --data "$work/corpus" --out --no-checkpoint
expect_error "a trailing comma" "--variants has an empty item in 'self,'" compare --variants self, --data "$work/corpus"
expect_error "an empty --data" "--data is empty" train "${tiny[@]}" --data ""
expect_error "an --out under a file" "cannot make the output folder" \
  compare --variants self --steps 1 "${tiny[@]}" --data "$work/corpus" --out "$work/corpus/sayings/report"
expect_error "a report over one of its runs" "is or holds the --from folder" \
  report --from "$work/the report,$work/apart" --out "$work/apart"
expect_error "a report over the folder of its runs" "is or holds the --from folder" \
  report --from "$work/seeds/seed-7,$work/seeds/seed-8" --out "$work/seeds"
expect_error "an empty --out" "--out is empty" compare --variants self "${tiny[@]}" --data "$work/corpus" --out ""
expect_error "help of an unknown subcommand" "unknown subcommand 'fly'" --help fly
mkdir -p "$work/negative"
sed 's/"fractions": \[[0-9.e-]*/"fractions": [-5/' "$work/apart/routing.json" >"$work/negative/routing.json"
expect_error "a negative routing fraction" "expert 0 has fraction -5, outside" report --from "$work/negative" \
  --out "$work/negative_report"
# Another program's comparison (vit_moe's routing.json reads alike) is not a gpt2_moe run.
mkdir -p "$work/vit_report"
sed 's/"command_line": "gpt2_moe /"command_line": "vit_moe /' "$work/apart/routing.json" >"$work/vit_report/routing.json"
expect_error "a vit_moe report" "is a report of 'vit_moe', not of a gpt2_moe comparison" \
  report --from "$work/the report,$work/vit_report" --out "$work/mixed_report"
# A saved --seq past the context (an edited checkpoint) is the file's error, not clamped.
LC_ALL=C sed 's/"train\.seq":"32"/"train.seq":"99"/' "$work/run/self.safetensors" >"$work/long_seq.safetensors"
expect_error "a saved --seq past the context" "long_seq.safetensors: the training options in its metadata are not valid" \
  train --resume "$work/long_seq.safetensors" --data "$work/corpus"
# A run that fails before writing anything (here: too little data for one window) leaves no empty folder.
mkdir -p "$work/scant"
for i in $(seq 1 40); do printf 'Short %d.\n%%\n' "$i"; done >"$work/scant/text"  # a validation split < 33 tokens
if "$bin" train --variant self --steps 1 "${tiny[@]}" --data "$work/scant" --out "$work/scant_run/inner" \
  >"$work/scant.log" 2>&1 || ! grep -q "too few for one window" "$work/scant.log"; then
  fail "too little data: $(cat "$work/scant.log")"
fi
[[ ! -e $work/scant_run ]] || fail "a failed run left its output folder: $(ls -R "$work/scant_run")"

if [[ $failures -ne 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all gpt2_moe command-line checks passed"
