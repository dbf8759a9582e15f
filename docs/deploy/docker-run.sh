#!/bin/sh
# A container that runs a task in the env bound to etl/prep: only the mount is shared.
# rslave: the container also sees the kernel-served views the daemon places under /envs.
exec docker run --rm -v /envs:/envs:ro,rslave debian:12-slim \
    /envs/etl/prep/bin/python -c 'import numpy; print(numpy.__version__)'
