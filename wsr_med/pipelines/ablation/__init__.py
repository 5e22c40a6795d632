"""Ablation study: heads x backbones x image sizes x patient-level folds x seeds, each cell a run of the bundle.

    wsr-med ablate --dataset-dir ../shared/data/chest_xray_pneumonia/labels_3class.csv \\
        --output-dir runs/ablation_chest3 --heads gap wise wise_unconstrained depthwise gem flatten \\
        --sizes 128 --folds 5 --seeds 0 1 2 --set "backbone_kwargs={'init_features':16,'growth_rate':8,'block_config':[2,2,2,2]}" max_epochs=15

Protocol. For each seed the patients are split into k folds (stratified; the seed draws the folds). A cell
holds one fold out as its test fold; of the other folds' patients, ``val_fraction`` (stratified) is an
inner validation split, which alone picks the checkpoint (best inner-validation AUC). The held-out fold
chooses nothing: it is evaluated after training, with the selected model (``eval/``) and with the last
epoch's (``eval_last/``), on uncalibrated probabilities.

All cells are child runs of one MLflow parent run, named after the network (``densenet-16-8-2222-128-wise-fold0-seed1``).
The study writes ``summary.csv`` / ``summary.md``: per head the mean and spread of the outer-fold AUC and
accuracy over folds x seeds, the last epoch's AUC, parameters, seconds per epoch, the shuffle diagnostic,
and the AUC difference to ``gap`` (paired, same cases) with the corrected resampled t-test over folds x
seeds (Nadeau & Bengio 2003) and, as a secondary column, a case bootstrap with each model fixed; the
differences of every fold and seed are listed under the table. Plus ``auc_by_head.png`` (t intervals)
and ``val_curves.png``, logged to the parent run. A study folder holds one set of overrides
(``grid.json``): a rerun with other ``--set`` values is refused, naming the keys. Run the same command
again after an interruption: finished cells are skipped, an interrupted cell resumes from its last epoch.

Spreading a study. ``--workers N`` runs N cells at once, one process each: on a machine with GPUs, worker
k sees GPU k mod (number of GPUs) alone (``CUDA_VISIBLE_DEVICES``); on the CPU the cores are shared out.
``--shard i/N`` runs every N-th cell starting with the i-th, so N machines (a Slurm array, or N shells)
that see the same study folder and MLflow server share one grid, one experiment and one parent run. Every
process writes the summary of the cells finished so far when it ends: the last one to finish writes the
whole study's. A worker that dies leaves its cell to the next run of the same command.
"""

from wsr_med.pipelines.ablation.cells import finished_results, load_cell, run_cell
from wsr_med.pipelines.ablation.grid import Cell
from wsr_med.pipelines.ablation.study import main
from wsr_med.pipelines.ablation.summary import paired_difference, summarise

__all__ = ["Cell", "finished_results", "load_cell", "main", "paired_difference", "run_cell", "summarise"]
