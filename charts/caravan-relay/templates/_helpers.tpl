{{- define "relay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "relay.labels" -}}
app.kubernetes.io/name: caravan-relay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "relay.secret" -}}
{{- .Values.existingSecret | default (include "relay.fullname" .) -}}
{{- end -}}
