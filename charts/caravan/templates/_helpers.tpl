{{- define "caravan.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "caravan.labels" -}}
app.kubernetes.io/name: caravan-controller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "caravan.selector" -}}
app.kubernetes.io/name: caravan-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The namespace the controller manages: its Caravan objects, the relays of its Sites, their Secrets. Empty when cluster-wide. */}}
{{- define "caravan.watchNamespace" -}}
{{- if hasKey .Values "watchReleaseNamespaceOnly" -}}{{ fail "watchReleaseNamespaceOnly is gone: the controller manages one namespace by default (watchNamespace); set clusterWide: true for every namespace" }}{{- end -}}
{{- if and .Values.clusterWide .Values.watchNamespace -}}{{ fail "set either watchNamespace or clusterWide, not both" }}{{- end -}}
{{- if not .Values.clusterWide -}}{{ .Values.watchNamespace | default .Release.Namespace }}{{- end -}}
{{- end -}}
