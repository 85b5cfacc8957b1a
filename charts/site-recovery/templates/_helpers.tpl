{{/* The release's name prefix, short enough that node names (site-fullname-ps-NN) stay under 64. */}}
{{- define "sr.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "process-server") */}}
{{- define "sr.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sr.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* host:port of the configuration server's API as the components reach it. */}}
{{- define "sr.configServerAddress" -}}
{{- if .Values.configServer.enabled -}}
{{ include "sr.fullname" . }}-cs.{{ .Release.Namespace }}.svc:{{ .Values.configServer.port }}
{{- else -}}
{{ required "configServer.address: host:port of the configuration server (configServer.enabled is false)" .Values.configServer.address }}
{{- end -}}
{{- end -}}

{{- define "sr.registrationSecret" -}}
{{- .Values.registration.existingSecret | default (printf "%s-registration" (include "sr.fullname" .)) -}}
{{- end -}}

{{/* A bind address with a port: (list $ port) */}}
{{- define "sr.bind" -}}
{{- $root := index . 0 -}}
{{- if contains ":" $root.Values.listenAddress -}}
[{{ $root.Values.listenAddress }}]:{{ index . 1 }}
{{- else -}}
{{ $root.Values.listenAddress }}:{{ index . 1 }}
{{- end -}}
{{- end -}}

{{/* Pod anti-affinity for one component: (dict "root" $ "component" "process-server") */}}
{{- define "sr.antiAffinity" -}}
{{- if eq .root.Values.antiAffinity "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "sr.selector" . | nindent 10 }}
{{- else if eq .root.Values.antiAffinity "soft" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "sr.selector" . | nindent 12 }}
{{- end }}
{{- end -}}
