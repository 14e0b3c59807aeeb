"""rundir: the run directory of a long training run, the thread that writes it, load_run.

Modules: runlog (the Monitor's side), writer (the thread), files, load.

Owns the files under `log_dir` and the writer thread. It reads the Monitor's statistics only
through copies taken in Monitor.step (snapshot) and must not touch the LayerStates, the
model or the optimizer. Only rank 0 writes (see distributed.py).

Files (numpy and pandas read each directly):
  run.json      {"format", "run_id", "created", "world_size", "options", "layers",
                "neurons", "metric_columns", "resumes", "skipped", "coverage"}; written
                whole (temp name, then os.replace) at instrument and on resume. "skipped"
                lists the modules instrument could not serve as [name, reason] and
                "coverage" holds {"trainable_parameters", "monitored_parameters"}, both as
                Monitor.coverage() reported them at instrument; runs written before these
                two fields read without them.
  metrics.csv   header `step,layer,<the keys of mon.metrics()[layer]>`, then one row per
                (logged step, layer), appended every log_every steps; a step's rows go out
                as complete lines in one os.write. Read it with
                np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)
                or pandas.read_csv(path).
  scalars.csv   header `step,name,value`, then one row per (step, name) of each
                Monitor.log_scalars(values, step) call ("sharpness",
                "preconditioned_sharpness", "spectra/{layer}/...": see sharpness.py), in
                call order; `step` is the one passed, the run's step by default. Written by
                the writer thread like metrics.csv (a call's rows in one os.write); read it
                with np.genfromtxt as above or lf.load_run(dir).scalars
                ({name: (steps, values)}).
  summaries/step_{step:09d}.npz
                every summary_every steps and at flush()/close(): one array per
                "{layer}/{key}", the per-neuron keys of mon.summary() ([N] arrays and the
                scalar "steps"). The per-element weight.temporal_var is not written (it is
                weight-sized; mon.summary() and state_dict() have it). Written as
                summaries/.step_{step:09d}.npz.tmp, then os.replace'd.
  windows/{statistic}.f64
                with instrument's `windows` option: one record per closed window of that
                statistic, float64 little-endian: the run's step at its close, its
                first_step and last_step (Monitor.steps), then the per-neuron values of
                each column [layer, key, neurons] that run.json's "windows" lists. Appended
                in one write per record; a partial last record (a killed write) is ignored
                by load_run and cut before the next append. Read it with
                np.fromfile(path, "<f8").reshape(-1, 3 + sum of the columns' neurons), or
                lf.load_run(dir).windows[statistic] (a WindowRows of [W] and [W, N] arrays).
  tensorboard/  with tensorboard=True: scalars "{layer}/{metric}" every log_every steps,
                histograms "{layer}/weight.spread" and "{layer}/bias.spread" per summary,
                and the scalars of scalars.csv under their names.
`step` is the run's step: Monitor.step() calls since the run began. reset() does not restart
it and a resumed run continues it (the summaries' "steps" key restarts at reset()).

Crash safety: a SIGKILL at any moment leaves a directory load_run reads. run.json and
summaries appear whole or not at all; load_run ignores a partial last line of metrics.csv
and of scalars.csv (and a last step with only some of its layers) and leftover temp files;
the writer cuts a partial last line before it appends again. What is lost is what had not
reached the files: the writer's queue. flush() and state_dict() wait until it is written. (Nothing is
fsync'ed: a machine crash or power loss can lose more.)

Off the training step's critical path: at a logging step, step() takes device-side copies
(clone(); the element-mode weight state is reduced on the device to the per-neuron spread,
so a copy is O(neurons)) and puts them on a queue of QUEUE_SIZE items; the writer thread
copies them to the host, computes summaries and metrics and writes. step() never
synchronises with the device. When the queue is full, step() BLOCKS until the writer takes
an item: nothing is dropped, so the files have no gaps (a stalled filesystem stalls
training). Under a process group a logging step also runs one all_gather.

Bounded: the Monitor's state is fixed-size, the queue holds at most QUEUE_SIZE snapshots and
the writer keeps no per-step history, so memory is flat over any number of steps
(measured: 28k logged steps and 1400 summaries of a 2-layer net, no RSS growth after
warm-up; tests/test_rundir.py checks 20k steps).
Disk (measured): metrics.csv grows ~100 bytes per layer per logged step (9 columns, floats
in Python's shortest repr); a summary file is ~3.5 kB per layer (12 arrays with their
npy and zip headers) plus 88 bytes per neuron (11 float64/int64 values). E.g. 100 layers of
1024 neurons, log_every=100, summary_every=1000, 100k steps: 10 MB of metrics.csv and 100
summaries of 9.4 MB each: for wide models, raise summary_every. A window record is
8 bytes x (3 + the sum over its columns of their neurons): gradient windows of every step
on 100 layers of 1024 neurons add 3.3 MB per step.

Resume: Monitor.state_dict() holds {"run_id", "step"} and waits for the writer. A new
process calls instrument(..., log_dir=same dir), then load_state_dict(checkpoint): rows of
metrics.csv and scalars.csv after the checkpoint's step (logged by the crashed run after its
checkpoint) are dropped by rewriting the files atomically, later summaries and window records are deleted, TensorBoard purges
later events, and logging goes on from the checkpoint's step: no gap, no duplicated step.

Refused: a log_dir holding another run with other layers or statistics options (ValueError
at instrument), or a run with logged data that is not resumed (ValueError at the first
step() or flush(), or at load_state_dict of another run's checkpoint).
Write errors (full disk, removed directory): training goes on with one RuntimeWarning per
spell of failures (not one per step); the records of the steps whose writes fail are lost, a
failed write leaves no temp file, and the summary a failed write owed is written at the first
write that succeeds (when space returns). Temp files of writes a killed run left are removed
when a run directory is opened. With log_errors="raise" the next step(), flush() or close()
raises RuntimeError instead.
"""
from .load import Metrics, Run, WindowRows, load_run
from .runlog import LOG_OPTIONS, RunLog, check_scalars
from .writer import QUEUE_SIZE, summary_writer_class

__all__ = ["LOG_OPTIONS", "QUEUE_SIZE", "Metrics", "Run", "WindowRows", "RunLog", "check_scalars", "load_run", "summary_writer_class"]
