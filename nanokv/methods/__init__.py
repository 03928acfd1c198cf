"""One file per compression method. Each is registered in nanokv.METHODS by its `name`."""
