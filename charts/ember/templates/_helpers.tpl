{{/* Name of the release's objects: <release>-ember unless the release name already says ember. */}}
{{- define "ember.fullname" -}}
{{- if contains "ember" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-ember" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ember.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* Image of a component: its override, else <registry>/ember-<component>:<tag>. Call with (list . "operator"). */}}
{{- define "ember.image" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $override := (index $root.Values $component).image -}}
{{- if $override -}}
{{- $override -}}
{{- else -}}
{{- printf "%s/ember-%s:%s" $root.Values.image.registry $component (include "ember.tag" $root) -}}
{{- end -}}
{{- end -}}

{{- define "ember.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: ember
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of a component. Call with (list . "operator"). */}}
{{- define "ember.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: ember-{{ index . 1 }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- end -}}

{{- define "ember.activatorUrl" -}}
{{- printf "http://%s-activator.%s.svc:%d" (include "ember.fullname" .) .Release.Namespace (int .Values.activator.service.port) -}}
{{- end -}}

{{/* "runtime=value,..." from a map, sorted for stable output. */}}
{{- define "ember.pairs" -}}
{{- $out := list -}}
{{- range $k, $v := . -}}
{{- $out = append $out (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," (sortAlpha $out) -}}
{{- end -}}

{{- define "ember.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ember.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The Secret and key holding the async store's Redis URL: the user's, or the chart's Redis's. */}}
{{- define "ember.asyncStoreSecret" -}}
{{- .Values.asyncStore.existingSecret | default (printf "%s-redis" (include "ember.fullname" .)) -}}
{{- end -}}

{{- define "ember.asyncStoreKey" -}}
{{- if .Values.asyncStore.existingSecret -}}{{ .Values.asyncStore.existingSecretKey }}{{- else -}}url{{- end -}}
{{- end -}}
