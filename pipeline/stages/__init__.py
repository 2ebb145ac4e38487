"""One module per stage, each `run(config, reporter) -> Result`; stages never print."""
