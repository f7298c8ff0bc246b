"""Do the scorers find causal safety units? The criteria and tables of results/attribution_validity.md and their small
JSON inputs."""
