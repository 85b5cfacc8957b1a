{{/*
A process server's or master target's StatefulSet, headless Service and per-pod Services:
(dict "root" $ "component" "process-server" "short" "ps" "v" .Values.processServer)
*/}}
{{- define "sr.worker" -}}
{{- $root := .root -}}
{{- $v := .v -}}
{{- $name := printf "%s-%s" (include "sr.fullname" $root) .short -}}
{{- $c := dict "root" $root "component" .component -}}
{{- if gt (int $v.replicas) (int $v.maxReplicas) }}
{{- fail (printf "%s: replicas (%d) is more than maxReplicas (%d): registration keys are made for ordinals below maxReplicas" .component (int $v.replicas) (int $v.maxReplicas)) }}
{{- end -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels:
    {{- include "sr.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    site-recovery/metrics: "true"
spec:
  # Headless: the StatefulSet's pod names, and what a ServiceMonitor scrapes.
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "sr.selector" $c | nindent 4 }}
  ports:
    - {name: http, port: {{ $v.ports.http }}, targetPort: http, protocol: TCP}
{{- range $i := until (int $v.replicas) }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}-{{ $i }}
  labels:
    {{- include "sr.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $.component }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  {{- if ne $v.service.type "ClusterIP" }}
  # Keep the peers' own addresses, so that NetworkPolicies on them hold.
  externalTrafficPolicy: Local
  {{- end }}
  {{- if and (ne $v.service.type "ClusterIP") (lt $i (len $v.advertise)) }}
  loadBalancerIP: {{ index $v.advertise $i }}
  {{- end }}
  selector:
    {{- include "sr.selector" $c | nindent 4 }}
    statefulset.kubernetes.io/pod-name: {{ $name }}-{{ $i }}
  ports:
    # What peers reach: QUIC; for a master target also its API (the configuration server calls it)
    # and NBD. A process server's HTTP port (health, metrics) stays inside the cluster.
    - {name: quic, port: {{ $v.ports.quic }}, targetPort: quic, protocol: UDP}
    {{- if $v.ports.nbd }}
    - {name: http, port: {{ $v.ports.http }}, targetPort: http, protocol: TCP}
    - {name: nbd, port: {{ $v.ports.nbd }}, targetPort: nbd, protocol: TCP}
    {{- end }}
{{- end }}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  labels:
    {{- include "sr.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  replicas: {{ $v.replicas }}
  serviceName: {{ $name }}
  podManagementPolicy: Parallel
  selector:
    matchLabels:
      {{- include "sr.selector" $c | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "sr.selector" $c | nindent 8 }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      automountServiceAccountToken: false
      # A clean stop lets the service finish what it holds (a batch being applied, the cache's index).
      terminationGracePeriodSeconds: 60
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      # Registration (on the first start only) runs in its own container: the service's container
      # never sees the registration keys.
      initContainers:
        - name: register
          image: {{ include "sr.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/sh", "/etc/site-recovery/bin/entrypoint.sh", {{ .component | quote }}]
          env:
            - name: SR_REGISTER_ONLY
              value: "1"
            {{- include "sr.workerEnv" . | nindent 12 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - {name: data, mountPath: /data}
            - {name: entrypoint, mountPath: /etc/site-recovery/bin, readOnly: true}
            - {name: registration, mountPath: /etc/site-recovery/registration, readOnly: true}
            - {name: tmp, mountPath: /tmp}
      containers:
        - name: {{ .component }}
          image: {{ include "sr.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/sh", "/etc/site-recovery/bin/entrypoint.sh", {{ .component | quote }}]
          env:
            {{- include "sr.workerEnv" . | nindent 12 }}
          ports:
            - {name: quic, containerPort: {{ $v.ports.quic }}, protocol: UDP}
            - {name: http, containerPort: {{ $v.ports.http }}, protocol: TCP}
            {{- if $v.ports.nbd }}
            - {name: nbd, containerPort: {{ $v.ports.nbd }}, protocol: TCP}
            {{- end }}
          startupProbe:
            httpGet: {path: /healthz, port: http, scheme: HTTPS}
            periodSeconds: 2
            failureThreshold: 150
          readinessProbe:
            httpGet: {path: /healthz, port: http, scheme: HTTPS}
            periodSeconds: 5
          livenessProbe:
            httpGet: {path: /healthz, port: http, scheme: HTTPS}
            periodSeconds: 10
            failureThreshold: 6
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - {name: data, mountPath: /data}
            - {name: config, mountPath: /etc/site-recovery/config, readOnly: true}
            - {name: entrypoint, mountPath: /etc/site-recovery/bin, readOnly: true}
            - {name: tmp, mountPath: /tmp}
      volumes:
        - name: config
          configMap:
            name: {{ include "sr.fullname" $root }}-config
            items: [{key: {{ printf "%s.toml" .component }}, path: {{ printf "%s.toml" .component }}}]
        - name: entrypoint
          configMap:
            name: {{ include "sr.fullname" $root }}-entrypoint
        - name: registration
          secret:
            secretName: {{ include "sr.registrationSecret" $root }}
            defaultMode: 0400
            # A Secret made by hand may hold keys for fewer ordinals than maxReplicas.
            optional: true
            # Only this role's keys.
            items:
              {{- range $i := until (int $v.maxReplicas) }}
              - {key: {{ printf "%s-%d" $.component $i }}, path: {{ printf "%s-%d" $.component $i }}}
              {{- end }}
        - name: tmp
          emptyDir: {}
      affinity:
        {{- with $v.affinity }}
        {{- toYaml . | nindent 8 }}
        {{- else }}
        {{- include "sr.antiAffinity" $c | nindent 8 }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  volumeClaimTemplates:
    - metadata:
        name: data
      spec:
        accessModes: [ReadWriteOnce]
        {{- with $v.persistence.storageClass }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ $v.persistence.size }}
{{- end -}}


{{/* The environment the entrypoint reads, for both containers of a worker pod. */}}
{{- define "sr.workerEnv" -}}
{{- $root := .root -}}
{{- $v := .v -}}
{{- $name := printf "%s-%s" (include "sr.fullname" $root) .short -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: SR_SITE
  value: {{ $root.Values.site | quote }}
- name: SR_CONFIG_SERVER
  value: {{ include "sr.configServerAddress" $root | quote }}
- name: SR_ADVERTISE_IPS
  value: {{ join " " $v.advertise | quote }}
- name: SR_SANS
  value: {{ printf "%s.%s.svc" $name $root.Release.Namespace | quote }}
- name: SR_PORT_QUIC
  value: {{ $v.ports.quic | quote }}
- name: SR_PORT_HTTP
  value: {{ $v.ports.http | quote }}
{{- if $v.ports.nbd }}
- name: SR_PORT_NBD
  value: {{ $v.ports.nbd | quote }}
{{- end }}
- name: RUST_LOG
  value: {{ $root.Values.logLevel | quote }}
{{- end -}}
