"""Where pods come from: the `PodSource` interface (`base`), pure builders (`payload`), local processes (`local`)."""
