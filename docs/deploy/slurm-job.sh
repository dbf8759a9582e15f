#!/bin/bash
#SBATCH --job-name=etl-prep
#SBATCH --ntasks=1
#SBATCH --time=00:10:00
# Every node runs the envfs daemon (envfs.service); the task names its env by path.
# `envfs resolve` pins the revision current at submission for every step of the job.
set -euo pipefail
ENV=$(/opt/envfs/.venv/bin/envfs resolve etl/prep)
srun "$ENV/bin/python" -c 'import numpy; print(numpy.__version__)'
