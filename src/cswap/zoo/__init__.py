"""The reference model zoo: architectures, recipes, committed weights and their manifest."""
