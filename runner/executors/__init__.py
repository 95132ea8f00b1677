"""Executors: how a task's worker is started, watched and stopped, one module per backend.

- `specs`: every backend's manifest section and the registry of backends (`SPECS`); a leaf, read by
  the manifest;
- `registry`: makes the executor a run asks for (`make_executor`), maps a manifest's section onto
  another backend (`spec_for`), and recovers what a dead runner left (`recover`);
- `base`: the interface (`Executor`, `Handle`, `Slot`) and the slots of this machine;
- one module per backend: `local`, `docker` (+ `docker_spec`, the container it makes), `ray`.

A backend is its module and one entry in `specs.SPECS`. Its class names its manifest section (`Spec`),
makes itself and its slots from it (`from_spec`), adopts the attempts a killed runner left that still
run (`adopt`), and stops what is left of the others (`stop_leftovers`), so the scheduler names no
backend. Importing a backend module must not import its SDK: the docker SDK and Ray load only when an
executor is made. This `__init__` imports nothing, so that reading `specs` loads no backend.
"""
