"""Two training jobs on one machine: per-iteration time of each, against one job alone.

    python benchmarks/bench_two_jobs.py [--config-file configs/forest/p2p_R18_s8.yaml]
        [--iters 60] [--policies auto,unmanaged,1]

Each policy is a value of the CPR_D2_THREADS environment variable that every job
runs with (see cpr_d2/utils/threads.py):
  auto       the default: a job uses its share of the machine's cores, the cores
             divided by the cpr_d2 jobs running on it, rechecked as jobs start and end
  unmanaged  torch's own default (every job takes every core)
  N          N threads per job
For each policy, one job is run alone, then two are started together; every job
is `tools/train_net.py` for --iters iterations (no evaluation, no checkpoint), and
its time per iteration is the median of detectron2's "time" over the iterations
after the first 20 (OUTPUT_DIR/metrics.json). The ratio printed is (time of each of
the two jobs) / (time of the job alone, same policy), and against the job alone
with torch's default threads: the issue is what a second job costs the first.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def iteration_time(output_dir):
    """Median seconds per iteration after the first logging window (warm-up)."""
    times = []
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "time" in row and row.get("iteration", 0) >= 20:
                times.append(row["time"])
    if not times:
        raise RuntimeError(f"{output_dir}/metrics.json has no iteration time after warm-up")
    return statistics.median(times)


def start_job(config_file, iters, policy, output_dir, log):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env["CPR_D2_THREADS"] = policy
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"),
           "--config-file", config_file,
           "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()",
           "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "SOLVER.WARMUP_ITERS", "0",
           "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
           "MODEL.P2PNET.COUNT_CALIBRATION", "", "OUTPUT_DIR", output_dir]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_jobs(config_file, iters, policy, count, workdir):
    """Start `count` jobs together; their seconds per iteration."""
    jobs = []
    for k in range(count):
        out = os.path.join(workdir, f"{policy}_{count}_{k}")
        log = open(out + ".log", "w")
        jobs.append((start_job(config_file, iters, policy, out, log), out, log))
    times = []
    for proc, out, log in jobs:
        rc = proc.wait()
        log.close()
        if rc != 0:
            with open(out + ".log") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"a job with CPR_D2_THREADS={policy} failed (exit {rc}):\n{tail}")
        times.append(iteration_time(out))
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/forest/p2p_R18_s8.yaml")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--policies", default="auto,unmanaged,1")
    args = parser.parse_args(argv)
    if args.iters < 40:
        parser.error("--iters must be at least 40 (20 warm-up iterations, then 20 timed)")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    print(f"{os.cpu_count()} CPUs; {args.config_file}, {args.iters} iterations per job")
    rows, alone = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_two_jobs_") as workdir:
        for policy in policies:
            start = time.time()
            alone[policy] = run_jobs(args.config_file, args.iters, policy, 1, workdir)[0]
            pair = run_jobs(args.config_file, args.iters, policy, 2, workdir)
            rows.append((policy, alone[policy], pair))
            print(f"  {policy}: done in {time.time() - start:.0f} s", flush=True)
    base = alone.get("unmanaged")
    print()
    print("| CPR_D2_THREADS | one job s/it | two jobs s/it (each) | ratio vs alone, same policy"
          + (" | ratio vs one unmanaged job |" if base else " |"))
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if base else ""))
    for policy, one, pair in rows:
        each = " / ".join(f"{t:.3f}" for t in pair)
        ratio = " / ".join(f"{t / one:.2f}" for t in pair)
        line = f"| {policy} | {one:.3f} | {each} | {ratio} |"
        if base:
            line += " " + " / ".join(f"{t / base:.2f}" for t in pair) + " |"
        print(line)


if __name__ == "__main__":
    main()
