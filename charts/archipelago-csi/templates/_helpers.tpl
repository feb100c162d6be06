{{/* Names and labels shared by every object of the release. */}}
{{- define "archip.name" -}}archipelago-csi{{- end -}}

{{- define "archip.fullname" -}}
{{- if contains "archipelago-csi" .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-archipelago-csi" .Release.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "archip.labels" -}}
app.kubernetes.io/name: {{ include "archip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "archip.selector" -}}
app.kubernetes.io/name: {{ include "archip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "archip.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "archip.sidecarImage" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{- define "archip.validate" -}}
{{- if not (has .Values.backend.type (list "file" "rados")) -}}
{{- fail (printf "backend.type must be file or rados, not %q" .Values.backend.type) -}}
{{- end -}}
{{- if and (eq .Values.backend.type "rados") (not (and .Values.backend.rados.clusterID .Values.backend.rados.monitors)) -}}
{{- fail "backend.type rados needs backend.rados.clusterID (the fsid, `ceph fsid`) and backend.rados.monitors" -}}
{{- end -}}
{{- end -}}

{{/*
The backend archip's peer set opens (ARCHIP_BACKEND), for rados with the driver's standing
cephx credential: the id and key come from the Ceph Secret into this container's own
environment (key-env=, never an argument or a file), and the StorageClass secrets of each
request are checked against the cluster as well (csi/src/secrets.rs). The Secret must be in
the release namespace for secretKeyRef.
*/}}
{{- define "archip.backendEnv" -}}
{{- if eq .Values.backend.type "rados" }}
{{- $r := .Values.backend.rados }}
- name: ARCHIP_CEPH_USER
  valueFrom:
    secretKeyRef:
      name: {{ $r.secret.name }}
      key: userID
- name: ARCHIP_CEPH_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $r.secret.name }}
      key: userKey
- name: ARCHIP_BACKEND
  value: "rados:pool={{ $r.pool }},namespace={{ $r.namespace | default "archip" }},mon={{ $r.monitors | replace "," ";" }},id=$(ARCHIP_CEPH_USER),key-env=ARCHIP_CEPH_KEY"
{{- end }}
{{- end -}}

{{- define "archip.cephSecretNamespace" -}}
{{ .Values.backend.rados.secret.namespace | default .Release.Namespace }}
{{- end -}}

{{/* archip's own flags shared by controller and node. */}}
{{- define "archip.logArgs" -}}
{{- if .Values.logFormat }}
- --log-format={{ .Values.logFormat }}
{{- end }}
{{- end -}}

{{/*
The controller's containers: archip controller and its sidecars. Rendered into the central
Deployment (rados) or into the node DaemonSet (file), where provisioner and snapshotter run in
their node-deployment mode beside the node plugin that holds the node-local data.
Argument: dict "root" $ "perNode" bool.
*/}}
{{- define "archip.controllerContainers" -}}
{{- $ := .root -}}
{{- $perNode := .perNode -}}
{{- $v := $.Values -}}
{{- $sc := $v.sidecars -}}
- name: archip-controller
  image: {{ include "archip.image" $ }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args:
    - controller
    - --endpoint=unix:///csi-controller/controller.sock
    # Its own segment: controller and node on one host must not share one.
    - --segment={{ $v.controller.segment }}
    {{- include "archip.logArgs" $ | indent 4 }}
    {{- if $v.metrics.enabled }}
    - --metrics-addr=0.0.0.0:{{ $v.metrics.controllerPort }}
    {{- end }}
  env:
    # The node id: the controller derives its lock owner csi-controller@NODE from it.
    - name: ARCHIP_NODE
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    - name: ARCHIP_DATA_DIR
      value: /var/lib/archipelago/data
    - name: ARCHIP_PEERSET_DIR
      value: /run/archip/peersets
    {{- with include "archip.backendEnv" $ }}{{ . | indent 4 }}{{- end }}
    - name: RUST_LOG
      value: {{ $v.logLevel | quote }}
  securityContext:
    # It maps the xseg segment on the host's /dev/shm and signals peers by pid.
    privileged: true
  ports:
    - name: ctl-healthz
      containerPort: {{ if $perNode }}9809{{ else }}9808{{ end }}
    {{- if $v.metrics.enabled }}
    - name: ctl-metrics
      containerPort: {{ $v.metrics.controllerPort }}
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: ctl-healthz
    initialDelaySeconds: 10
    # livenessprobe waits up to {{ $sc.probeTimeout }} for Probe; leave it room.
    timeoutSeconds: 15
    periodSeconds: 30
    failureThreshold: 5
  resources: {{- toYaml $v.controller.resources | nindent 4 }}
  volumeMounts:
    - name: controller-socket
      mountPath: /csi-controller
    # Shared with the node plugin on this host: the xseg segments live on the host's /dev/shm,
    # the peer-set registry lets the controller forward writes to the lock holder's peer set.
    - name: host-shm
      mountPath: /dev/shm
    - name: run-archip
      mountPath: /run/archip
    - name: data
      mountPath: /var/lib/archipelago
- name: csi-provisioner
  image: {{ include "archip.sidecarImage" $sc.provisioner }}
  imagePullPolicy: {{ $sc.pullPolicy }}
  args:
    - --csi-address=/csi-controller/controller.sock
    - --feature-gates=Topology={{ if $perNode }}true{{ else }}false{{ end }}
    - --extra-create-metadata
    - --kube-api-qps={{ $sc.kubeApiQps }}
    - --kube-api-burst={{ $sc.kubeApiBurst }}
    - --timeout=60s
    {{- if $perNode }}
    # Distributed provisioning: each node's provisioner handles the PVCs scheduled to it.
    - --node-deployment=true
    - --node-deployment-immediate-binding=false
    - --strict-topology=true
    {{- else }}
    - --leader-election
    - --leader-election-namespace=$(POD_NAMESPACE)
    {{- end }}
  env:
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  resources: {{- toYaml $v.controller.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: controller-socket
      mountPath: /csi-controller
- name: csi-snapshotter
  image: {{ include "archip.sidecarImage" $sc.snapshotter }}
  imagePullPolicy: {{ $sc.pullPolicy }}
  args:
    - --csi-address=/csi-controller/controller.sock
    - --feature-gates=CSIVolumeGroupSnapshot=true
    - --kube-api-qps={{ $sc.kubeApiQps }}
    - --kube-api-burst={{ $sc.kubeApiBurst }}
    - --timeout=60s
    {{- if $perNode }}
    # Distributed snapshotting: snapshots of this node's volumes are taken here. The cluster's
    # snapshot-controller must run with --enable-distributed-snapshotting.
    - --node-deployment=true
    {{- else }}
    - --leader-election
    - --leader-election-namespace=$(POD_NAMESPACE)
    {{- end }}
  env:
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  resources: {{- toYaml $v.controller.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: controller-socket
      mountPath: /csi-controller
- name: csi-attacher
  image: {{ include "archip.sidecarImage" $sc.attacher }}
  imagePullPolicy: {{ $sc.pullPolicy }}
  args:
    - --csi-address=/csi-controller/controller.sock
    - --timeout=60s
    # The attacher has no node-deployment mode: one leader serves the cluster.
    - --leader-election
    - --leader-election-namespace=$(POD_NAMESPACE)
  env:
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  resources: {{- toYaml $v.controller.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: controller-socket
      mountPath: /csi-controller
- name: csi-resizer
  image: {{ include "archip.sidecarImage" $sc.resizer }}
  imagePullPolicy: {{ $sc.pullPolicy }}
  args:
    - --csi-address=/csi-controller/controller.sock
    - --timeout=60s
    - --handle-volume-inuse-error=false
    # The resizer has no node-deployment mode: one leader serves the cluster.
    - --leader-election
    - --leader-election-namespace=$(POD_NAMESPACE)
  env:
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  resources: {{- toYaml $v.controller.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: controller-socket
      mountPath: /csi-controller
- name: controller-livenessprobe
  image: {{ include "archip.sidecarImage" $sc.livenessprobe }}
  imagePullPolicy: {{ $sc.pullPolicy }}
  args:
    - --csi-address=/csi-controller/controller.sock
    - --probe-timeout={{ $sc.probeTimeout }}
    - --http-endpoint=:{{ if $perNode }}9809{{ else }}9808{{ end }}
  resources: {{- toYaml $v.controller.sidecarResources | nindent 4 }}
  volumeMounts:
    - name: controller-socket
      mountPath: /csi-controller
{{- end -}}

{{/* Volumes the controller containers mount; see the comments on the mounts. */}}
{{- define "archip.controllerVolumes" -}}
- name: controller-socket
  emptyDir: {}
- name: host-shm
  hostPath:
    path: /dev/shm
    type: Directory
- name: run-archip
  hostPath:
    path: {{ .Values.node.runDir }}
    type: DirectoryOrCreate
- name: data
  hostPath:
    path: {{ .Values.backend.file.dataDir }}
    type: DirectoryOrCreate
{{- end -}}
