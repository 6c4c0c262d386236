"""Ember's real single-node Kubernetes for the `apiserver` and `cluster` test tiers.

Upstream binaries (kube-apiserver, kubelet, scheduler, controller-manager, gVisor's runsc) are built from
the Go module proxy into a versioned cache (`~/.cache/ember`), the control plane and node are started as
plain processes the way upstream's `local-up-cluster.sh` does, and images are built with buildah from a
debootstrap root filesystem and imported into containerd. Run `python -m tests.cluster build|up|down|status`.
"""
