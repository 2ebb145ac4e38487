venv := ".venv"
py := venv + "/bin/python"

# create the virtualenv and install the project with its dev extras
setup:
    python3 -m venv {{venv}}
    {{py}} -m pip install -e '.[dev]'

# run the demo: synthetic D3 data, tiny random-weight CLIP, whole cache end to end
demo:
    {{venv}}/bin/pipeline demo

# the test suite (heavy runs are marked slow and excluded)
test *ARGS:
    {{py}} -m pytest -q {{ARGS}}

# encode throughput: end-to-end vs forward-only, fp32 and bf16
bench *ARGS:
    {{py}} bench/bench_encode.py {{ARGS}}

lint:
    {{venv}}/bin/ruff check pipeline trainer schemas tests bench
    {{venv}}/bin/mypy pipeline trainer schemas
